"""Device residency of bundles: read + validate + precompute a bundle's prefix once, keep a bounded LRU of them.

Entries are keyed by the bundle's *content hash*, never its name, so a re-upload under the same name can never
serve a stale prefix (and two names with identical content share one entry). Requests `acquire` an entry (pinning
it) for their whole life and `release` it at the end; only unpinned entries are evicted. The loader runs in a worker
thread, so the decode loop keeps running for everyone else while a cold bundle loads (`build_engine`'s loader
reads and validates there and computes the prefix on the engine loop between two steps); at most `max_loading`
loads run at once (default 1: a burst of cold bundles would otherwise put several threads of torch work beside
the engine loop's on the same cores and stretch every running stream's steps).

This module does not resolve names (the store does) and does not schedule (the scheduler does).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch at import time: the engine core is tested without it
    from m2pt.prefix import BundlePrefix

log = logging.getLogger(__name__)


@dataclass
class ResidentBundle:
    """A loaded bundle. `label` is "name@version" of the reference it was first loaded under."""

    content_hash: str
    label: str
    prefix: BundlePrefix
    nbytes: int
    pins: int = 0


class BundleResidency:
    """LRU of precomputed prefixes with pin counts. `loader(ref) -> BundlePrefix` does the real work (blocking)."""

    def __init__(
        self, loader: Callable[[object], BundlePrefix], capacity: int = 32, metrics=None, max_loading: int = 1
    ) -> None:
        if capacity < 1 or max_loading < 1:
            raise ValueError("max_resident_bundles and max_loading must be ≥ 1")
        self._loader = loader
        self.capacity = capacity
        self.max_loading = max_loading
        self._load_slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self._metrics = metrics
        self._entries: OrderedDict[str, ResidentBundle] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, asyncio.Future] = {}

    async def acquire(self, ref) -> ResidentBundle:
        """Pin the bundle behind `ref` (a store `BundleRef`), loading it first if needed. Concurrent acquires of a
        cold bundle share one load. Load errors (validation) propagate and leave nothing behind."""
        key = ref.content_hash
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.pins += 1
                    self._entries.move_to_end(key)
                    return entry
                pending = self._loading.get(key)
            if pending is not None:
                await asyncio.shield(pending)  # another request is loading it; then retry the lookup
                continue
            return await self._load_and_pin(ref)

    async def _load_and_pin(self, ref) -> ResidentBundle:
        key = ref.content_hash
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            async with self._slots():
                started = time.perf_counter()
                prefix = await asyncio.to_thread(self._loader, ref)
                elapsed = time.perf_counter() - started
            entry = ResidentBundle(key, ref.label, prefix, prefix.nbytes(), pins=1)
            with self._lock:
                self._entries[key] = entry
                self._evict_over_capacity()
            self._observe_load(elapsed)
            log.info(
                "loaded bundle %s (%s, %.1f KiB) in %.3f s", ref.label, key[:19], entry.nbytes / 1024, elapsed
            )
            future.set_result(None)
            return entry
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters retry and load (and fail) themselves
            raise
        finally:
            del self._loading[key]

    def _slots(self) -> asyncio.Semaphore:
        """The load slots of the running event loop (a semaphore belongs to one loop; tests run several)."""
        loop = asyncio.get_running_loop()
        if self._load_slots is None or self._load_slots[0] is not loop:
            self._load_slots = (loop, asyncio.Semaphore(self.max_loading))
        return self._load_slots[1]

    def release(self, entry: ResidentBundle) -> None:
        """Unpin; the entry becomes evictable when no request holds it."""
        with self._lock:
            entry.pins = max(0, entry.pins - 1)
            self._evict_over_capacity()

    def _evict_over_capacity(self) -> None:
        """Evict least-recently-used unpinned entries while over capacity (pinned ones may exceed it briefly)."""
        for key in list(self._entries):
            if len(self._entries) <= self.capacity:
                break
            if self._entries[key].pins == 0:
                evicted = self._entries.pop(key)
                log.info("evicted bundle %s", evicted.label)
                if self._metrics is not None:
                    self._metrics.bundle_evictions.inc()
        if self._metrics is not None:
            self._metrics.resident_bundles.set(len(self._entries))

    def _observe_load(self, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.bundle_loads.inc()
            self._metrics.bundle_load_seconds.observe(seconds)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, content_hash: str) -> bool:
        return content_hash in self._entries
