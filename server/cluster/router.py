"""`BundleAffinityRouter`: Ray Serve's custom request-router API driven by `server.cluster.affinity`.

Ray runs one router per `DeploymentHandle` in the calling process (the ingress). For each request it asks
`choose_replicas` for ranked tiers; the first tier here is the single replica the affinity policy picked, the
next tiers the others in the bundle's rendezvous order (taken only if the first refuses the request because it
is at `max_ongoing_requests`, or, after `FIRST_CHOICE_TRIES` attempts, does not answer Ray's queue-length
probe in time). The routing key is the bundle's content hash, passed as the request's
`multiplexed_model_id` by `server.cluster.client` ("" for the base model).

State, all local to this process: each replica's in-flight requests (Ray's own queue-length cache, which
Ray increments on send and decrements on completion and refreshes by probing), the replicas each key was
routed to, and each replica's last `record_routing_stats` report (resident bundles). A key's holders are the
replicas it was routed to plus those reporting it resident; replicas that left are forgotten. The latest
reports are also published on `server.cluster.board` for the ingress's `/metrics`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from server.cluster import board
from server.cluster.affinity import AffinityPolicy

log = logging.getLogger(__name__)
FIRST_CHOICE_TRIES = 3


class BundleAffinityRouter(RequestRouter):
    def initialize_state(
        self, load_factor: float = 1.25, max_holders: int = 2, min_spill_load: int = 1, **_: Any
    ) -> None:
        self._policy = AffinityPolicy(load_factor, max_holders, min_spill_load)
        self._routed_to: dict[str, set[str]] = defaultdict(set)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id.unique_id for r in replicas}
        for key in list(self._routed_to):
            self._routed_to[key] &= live
        board.publish({r.replica_id.unique_id: r.routing_stats for r in replicas if r.routing_stats})

    def _holders(self, key: str, replicas: list[RunningReplica]) -> set[str]:
        held = set(self._routed_to.get(key, ()))
        for r in replicas:
            if key in (r.routing_stats or {}).get("resident", {}):
                held.add(r.replica_id.unique_id)
        return held

    def _held_counts(self, replicas: list[RunningReplica]) -> dict[str, int]:
        """Bundles each replica holds (routed there, or reported resident there)."""
        held: dict[str, set[str]] = defaultdict(set)
        for key, rids in self._routed_to.items():
            for rid in rids:
                held[rid].add(key)
        for r in replicas:
            held[r.replica_id.unique_id].update((r.routing_stats or {}).get("resident", {}))
        return {rid: len(keys) for rid, keys in held.items()}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        holders = self._holders(key, candidate_replicas) if key else set()
        loads = {rid: self.replica_queue_len_cache.get(r.replica_id) or 0 for rid, r in by_id.items()}
        ranked = self._policy.rank(key, list(by_id), loads, holders, self._held_counts(candidate_replicas))
        if key and ranked:
            self._routed_to[key].add(ranked[0])
        if pending_request is not None and ranked:
            # Ray drops a replica from a tier when its queue-length probe misses a short deadline (a busy
            # host), which would move the bundle by accident: the first choice alone gets FIRST_CHOICE_TRIES.
            tries = getattr(pending_request, "_m2pt_tries", 0) + 1
            pending_request._m2pt_tries = tries  # type: ignore[attr-defined]
            if tries <= FIRST_CHOICE_TRIES:
                return [[by_id[ranked[0]]]]
        return [[by_id[rid]] for rid in ranked]


class PowerOfTwoWithReports(PowerOfTwoChoicesRequestRouter):
    """Ray's default router, unchanged, that also publishes the replicas' reports (the no-affinity baseline
    keeps its `/metrics`)."""

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        board.publish({r.replica_id.unique_id: r.routing_stats for r in replicas if r.routing_stats})
