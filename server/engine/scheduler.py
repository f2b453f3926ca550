"""Continuous-batching scheduler: which waiting requests join the running batch before the next decode step.

Pure Python, no torch: it sees requests only as `ScheduledSeq` records (id, bundle key, arrival, deadline) and is
driven by the engine loop (`schedule()` → run the model → `finish()`). Tested in milliseconds without a model.

Policy:
- FIFO admission while the batch has free rows (`max_batch_size`) and the step's prefill budget
  (`max_prefill_rows`) allows.
- `max_bundles_per_batch` bounds the distinct bundles (None counts as one: the base model) among running rows.
  A request whose bundle does not fit blocks the queue behind it (strict FIFO), so no bundle starves;
  `max_bundles_per_batch=1` reproduces one-adapter-per-batch servers (vLLM `--max-loras 1`).
- Requests past their deadline, or aborted, leave the queue (or the batch) at the next `schedule()`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field


@dataclass
class ScheduledSeq:
    """What the scheduler knows about one request."""

    request_id: str
    bundle_key: Hashable | None  # the bundle's content hash, or None for the base model
    deadline: float | None = None  # time.monotonic() value; None = no timeout
    arrival: float = field(default_factory=time.monotonic)
    aborted: bool = False


@dataclass
class SchedulerOutput:
    """One step's decisions: `admit` joins the batch (prefill now); `expired`/`aborted` leave it (or the queue)."""

    admit: list[ScheduledSeq]
    expired: list[ScheduledSeq]
    aborted: list[ScheduledSeq]


class QueueFull(Exception):
    """`add` on a full waiting queue."""


class Scheduler:
    """Thread-safe: `add`/`abort` come from the API side, `schedule`/`finish` from the engine loop."""

    def __init__(
        self,
        max_batch_size: int = 16,
        max_queue: int = 256,
        max_bundles_per_batch: int | None = None,
        max_prefill_rows: int = 8,
        clock=time.monotonic,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_prefill_rows < 1:
            raise ValueError("max_batch_size, max_queue and max_prefill_rows must be ≥ 1")
        if max_bundles_per_batch is not None and max_bundles_per_batch < 1:
            raise ValueError("max_bundles_per_batch must be ≥ 1 or None (unlimited)")
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_bundles_per_batch = max_bundles_per_batch
        self.max_prefill_rows = max_prefill_rows
        self._clock = clock
        self._waiting: deque[ScheduledSeq] = deque()
        self._running: dict[str, ScheduledSeq] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)

    # ------------------------------------------------------------------ API side
    def add(self, seq: ScheduledSeq) -> None:
        """Queue `seq`; raises `QueueFull` when `max_queue` requests are already waiting."""
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})")
            self._waiting.append(seq)
            self._wakeup.notify()

    def abort(self, request_id: str) -> None:
        """Mark a waiting or running request aborted; it leaves at the next `schedule()`."""
        with self._lock:
            for seq in [*self._waiting, *self._running.values()]:
                if seq.request_id == request_id:
                    seq.aborted = True
            self._wakeup.notify()

    # ------------------------------------------------------------------ engine side
    def wait_for_work(self, timeout: float) -> bool:
        """Block until something waits or runs (or `timeout`); True if there is work."""
        with self._lock:
            if not self._waiting and not self._running:
                self._wakeup.wait(timeout)
            return bool(self._waiting or self._running)

    def wake(self) -> None:
        with self._lock:
            self._wakeup.notify_all()

    def schedule(self) -> SchedulerOutput:
        """Drop aborted/expired requests, then admit waiting ones under the batch, prefill and bundle limits."""
        now = self._clock()
        with self._lock:
            expired, aborted = self._drop_finished(now)
            admit: list[ScheduledSeq] = []
            bundles = {s.bundle_key for s in self._running.values()}
            while (
                self._waiting
                and len(self._running) < self.max_batch_size
                and len(admit) < self.max_prefill_rows
            ):
                head = self._waiting[0]
                if not self._bundle_fits(bundles, head.bundle_key):
                    break
                self._waiting.popleft()
                bundles.add(head.bundle_key)
                self._running[head.request_id] = head
                admit.append(head)
            return SchedulerOutput(admit, expired, aborted)

    def finish(self, request_id: str) -> None:
        """The engine is done with a running request (stop, length, error)."""
        with self._lock:
            self._running.pop(request_id, None)

    def _bundle_fits(self, bundles: set, key: Hashable | None) -> bool:
        limit = self.max_bundles_per_batch
        return limit is None or key in bundles or len(bundles) < limit

    def _drop_finished(self, now: float) -> tuple[list[ScheduledSeq], list[ScheduledSeq]]:
        expired: list[ScheduledSeq] = []
        aborted: list[ScheduledSeq] = []
        for seq in list(self._waiting) + list(self._running.values()):
            if seq.aborted:
                aborted.append(seq)
            elif seq.deadline is not None and now >= seq.deadline:
                expired.append(seq)
        gone = {s.request_id for s in expired + aborted}
        if gone:
            self._waiting = deque(s for s in self._waiting if s.request_id not in gone)
            for rid in gone:
                self._running.pop(rid, None)
        return expired, aborted

    # ------------------------------------------------------------------ introspection
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)
