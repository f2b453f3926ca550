"""Bundle-affinity placement: rendezvous (highest-random-weight) hashing with bounded load.

Contract of `AffinityPolicy.rank(key, replicas, loads, holders)`:
- every replica has an in-flight load (requests routed to it and not finished); the bound is
  `threshold = max(ceil(load_factor * (total_load + 1) / n_replicas), min_spill_load)`. The server sets
  `min_spill_load` to the engine's batch size: below it a replica still has free batch slots, so moving a
  bundle away would only cost a second load (and device memory) for nothing;
- a request for `key` goes to the first replica, in the key's rendezvous order, that already holds the key
  and is under the threshold; else, if the key has fewer than `max_holders` holders, to the first replica in
  rendezvous order that is under the threshold and holds fewer than `bundle_cap` bundles
  (`ceil(count_factor × average bundles held)`, count_factor 1.0: bounded load on bundle counts, so the
  bundles split evenly however the hashes fall), or failing that the first under the threshold (this is
  how a hot bundle spreads to a second replica: by policy, to a deterministic replica, never by accident);
  else to the least-loaded holder;
- the answer is a ranking (first choice first, then every other replica by rendezvous order) so the caller
  can fall back when the first choice refuses the request (full);
- requests without a key (the base model) go to the least-loaded replica.
Rendezvous order depends only on (key, replica id), so several routers (ingress replicas) agree on where a
bundle lives without talking to each other. No Ray here: the router in `server.cluster.router` feeds it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass


def rendezvous_order(key: str, replicas: Sequence[str]) -> list[str]:
    """`replicas` sorted by descending hash weight of (key, replica): the key's home first."""

    def weight(replica: str) -> bytes:
        return hashlib.blake2b(f"{key}\x00{replica}".encode(), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


@dataclass(frozen=True)
class AffinityPolicy:
    """See the module contract. `load_factor` ≥ 1 bounds imbalance (1.25: at most 125 % of the average)."""

    load_factor: float = 1.25
    max_holders: int = 2
    min_spill_load: int = 1
    count_factor: float = 1.0

    def threshold(self, loads: Mapping[str, int], replicas: Sequence[str]) -> int:
        total = sum(loads.get(r, 0) for r in replicas)
        return max(math.ceil(self.load_factor * (total + 1) / max(1, len(replicas))), self.min_spill_load)

    def bundle_cap(self, held: Mapping[str, int], replicas: Sequence[str]) -> int:
        """Most bundles a replica may hold before new ones are placed elsewhere (bounded load on counts)."""
        total = sum(held.get(r, 0) for r in replicas)
        return max(1, math.ceil(self.count_factor * (total + 1) / max(1, len(replicas))))

    def rank(
        self,
        key: str | None,
        replicas: Sequence[str],
        loads: Mapping[str, int],
        holders: Set[str],
        held: Mapping[str, int] | None = None,
    ) -> list[str]:
        """Every replica of `replicas`, best first, for a request of bundle `key` (None: no bundle).
        `held` counts the bundles each replica holds (placement of a new bundle skips replicas over
        `bundle_cap`)."""
        if not replicas:
            return []
        if not key:
            return sorted(replicas, key=lambda r: (loads.get(r, 0), r))
        order = rendezvous_order(key, replicas)
        limit = self.threshold(loads, replicas)
        live_holders = [r for r in order if r in holders]
        choice = next((r for r in live_holders if loads.get(r, 0) < limit), None)
        if choice is None and len(live_holders) < self.max_holders:
            choice = self._place(order, loads, limit, held or {}, live_holders)
        if choice is None and live_holders:
            choice = min(live_holders, key=lambda r: (loads.get(r, 0), order.index(r)))
        if choice is None:
            choice = min(order, key=lambda r: (loads.get(r, 0), order.index(r)))
        return [choice, *(r for r in order if r != choice)]

    def _place(
        self,
        order: list[str],
        loads: Mapping[str, int],
        limit: int,
        held: Mapping[str, int],
        holders: list[str],
    ) -> str | None:
        """A replica for a new copy of a bundle: first in rendezvous order under both the load bound and the
        bundle-count cap, else first under the load bound."""
        fresh = [r for r in order if r not in holders and loads.get(r, 0) < limit]
        cap = self.bundle_cap(held, order)
        return next((r for r in fresh if held.get(r, 0) < cap), fresh[0] if fresh else None)
