"""The scheduler: owns every `Request` record and decides, once per engine step, what the model does.

Pure Python, no torch; driven by the engine loop: `schedule()` → runner → `update_from_output()`. Tested in
milliseconds with a fake runner (tests/test_engine_core.py).

Policy (vLLM v1's, on a per-step token budget `max_num_batched_tokens`):
- every decoding request decodes one token every step (1 token of budget each);
- the rest of the budget goes to prompt work in arrival order: first the requests already being prefilled, then
  new ones admitted FIFO while fewer than `max_batch_size` are in flight and the bundle limit allows. A request's
  images are encoded first (cost: `PreparedRow.image_encode_cost`, its placeholder tokens scaled by what an
  image token costs against an LLM token, measured at startup by `m2pt.calibrate`; an encode larger than
  what is left may still run when it is the step's only prompt work, so a small budget never blocks an image),
  then its prompt is prefilled in chunks of what the budget leaves; a chunk never cuts one of the row's
  `atomic_spans` (Gemma 3's images, whose tokens attend both ways): it stops before the span, or, when the
  span starts it, takes the span whole;
- `max_bundles_per_batch` bounds the distinct bundles among requests in flight ("base" counts as one). A
  request whose bundle does not fit blocks the queue behind it (strict FIFO), so no bundle starves.

Every way a request ends is decided here, in `_finish`: EOS, `max_tokens`, a stop string (found by the output
processor's `detokenize` callback, called from `update_from_output`), deadlines, aborts and model failures.
Finished requests the runner holds are handed back in the next `SchedulerOutput.finished` so it frees them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from server.engine.config import EngineConfig
from server.engine.errors import QueueFullError
from server.engine.request import Request, RequestStatus
from server.engine.types import (
    FINISH_ABORT,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    FINISH_TIMEOUT,
)

# detokenize(request, token) -> True when a stop string appeared (the output processor's `push`).
Detokenize = Callable[[Request, int], bool]


@dataclass(frozen=True)
class PrefillChunk:
    """Prefill prompt tokens [start, end) of a request; `is_last` means the next token is sampled from it."""

    request_id: str
    start: int
    end: int
    is_last: bool
    bundle_label: str | None = None


@dataclass
class SchedulerOutput:
    """One step's work. The runner frees `finished`, registers `new`, encodes `encode`, runs `chunks`, then
    decodes `decode` (one token per request)."""

    new: list[Request] = field(default_factory=list)
    encode: list[str] = field(default_factory=list)
    chunks: list[PrefillChunk] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    num_scheduled_tokens: int = 0

    @property
    def has_model_work(self) -> bool:
        return bool(self.encode or self.chunks or self.decode)

    @property
    def is_empty(self) -> bool:
        return not (self.has_model_work or self.finished or self.new)


@dataclass
class RunnerOutput:
    """What the runner did: one sampled token per decoded request and per request whose last chunk ran;
    `failed` maps the requests the model raised on to a short reason."""

    sampled: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


class Scheduler:
    """Thread-safe: `add`/`abort` come from the API side; everything else from the engine loop thread."""

    def __init__(
        self, config: EngineConfig, detokenize: Detokenize, clock: Callable[[], float] = time.monotonic
    ):
        self.config = config
        self._detokenize = detokenize
        self._clock = clock
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admitted (prefilling or decoding), in admission order
        self._requests: dict[str, Request] = {}
        self._to_free: list[str] = []
        self._touched: dict[str, Request] = {}  # requests with output to emit
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._dirty = False

    # ------------------------------------------------------------------ API side
    def add(self, request: Request) -> None:
        """Queue `request`; raises `QueueFullError` when `max_queue` requests are already waiting."""
        with self._lock:
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(
                    f"server busy: {len(self._waiting)} requests are waiting (max_queue="
                    f"{self.config.max_queue}); retry later",
                    retry_after_s=1,
                )
            self._waiting.append(request)
            self._requests[request.request_id] = request
            self._notify()

    def abort(self, request_id: str) -> None:
        """Mark a request aborted; it finishes ("abort") at the next `schedule()`. Unknown ids are ignored."""
        with self._lock:
            request = self._requests.get(request_id)
            if request is not None:
                request.aborted = True
                self._notify()

    def wait_for_change(self, timeout: float) -> None:
        """Block until `add`/`abort`/`wake` (or `timeout`); returns at once if one happened since `schedule()`."""
        with self._lock:
            if not self._dirty:
                self._changed.wait(timeout)

    def wake(self) -> None:
        with self._lock:
            self._notify()

    def _notify(self) -> None:
        self._dirty = True
        self._changed.notify_all()

    # ------------------------------------------------------------------ engine loop
    def schedule(self) -> SchedulerOutput:
        """Finish aborted/expired requests, then fill the step's token budget (see the module policy)."""
        with self._lock:
            self._dirty = False
            self._drop_aborted_and_expired(self._clock())
            out = SchedulerOutput(
                decode=[r.request_id for r in self._running if r.status is RequestStatus.DECODING]
            )
            budget = self.config.max_num_batched_tokens - len(out.decode)
            for request in self._running:
                if request.status is RequestStatus.PREFILLING and budget > 0:
                    budget -= self._schedule_prompt(request, budget, out)
            budget = self._admit(budget, out)
            out.num_scheduled_tokens = self.config.max_num_batched_tokens - budget
            out.finished, self._to_free = self._to_free, []
            return out

    def _admit(self, budget: int, out: SchedulerOutput) -> int:
        bundles = {r.bundle_key for r in self._running}
        while self._waiting and budget > 0 and len(self._running) < self.config.max_batch_size:
            head = self._waiting[0]
            limit = self.config.max_bundles_per_batch
            if limit is not None and head.bundle_key not in bundles and len(bundles) >= limit:
                break
            used = self._schedule_prompt(head, budget, out)
            if used == 0:
                break
            budget -= used
            self._waiting.popleft()
            head.status = RequestStatus.PREFILLING
            self._running.append(head)
            bundles.add(head.bundle_key)
            out.new.append(head)
        return budget

    def _schedule_prompt(self, request: Request, budget: int, out: SchedulerOutput) -> int:
        """Schedule `request`'s image encode and/or next prompt chunk within `budget`; returns tokens used."""
        used = 0
        if request.needs_encode:
            cost = request.row.image_encode_cost
            if cost > budget and (out.encode or out.chunks):
                return 0
            out.encode.append(request.request_id)
            used = cost
        left = budget - used
        if left > 0:
            start = request.num_computed_tokens
            end = chunk_end(start, min(request.num_prompt_tokens, start + left), request.row.atomic_spans)
            is_last = end == request.num_prompt_tokens
            out.chunks.append(PrefillChunk(request.request_id, start, end, is_last, request.bundle_label))
            used += end - start
        return used

    def update_from_output(self, out: SchedulerOutput, result: RunnerOutput) -> None:
        """Apply what the runner did: failures, encoded images, prefilled chunks, sampled tokens (EOS, stop
        strings, max_tokens are decided here)."""
        now = self._clock()
        with self._lock:
            for request_id, reason in result.failed.items():
                self._finish_id(request_id, FINISH_ERROR, reason)
            for request_id in out.encode:
                if (request := self._live(request_id)) is not None:
                    request.images_encoded = True
            expect = set(out.decode)
            for chunk in out.chunks:
                if (request := self._live(chunk.request_id)) is not None:
                    request.num_computed_tokens = chunk.end
                    if chunk.is_last:
                        request.status = RequestStatus.DECODING
                        expect.add(chunk.request_id)
            for request_id in expect:
                request = self._live(request_id)
                if request is None:
                    continue
                token = result.sampled.get(request_id)
                if token is None:
                    self._finish(request, FINISH_ERROR, "the model returned no token for this request")
                else:
                    self._append_token(request, token, now)

    def _append_token(self, request: Request, token: int, now: float) -> None:
        if request.first_token_at is None:
            request.first_token_at = now
        request.last_token_at = now
        if token in request.eos_ids and not request.sampling.ignore_eos:
            self._finish(request, FINISH_STOP)
            return
        request.output_ids.append(token)
        self._touched[request.request_id] = request
        if self._detokenize(request, token):
            self._finish(request, FINISH_STOP)
        elif len(request.output_ids) >= request.sampling.max_tokens:
            self._finish(request, FINISH_LENGTH)

    def fail_running(self, reason: str) -> None:
        """An engine-level fault lost the runner's state: every admitted request fails (waiting ones stay)."""
        with self._lock:
            for request in list(self._running):
                self._finish(request, FINISH_ERROR, reason)

    def abort_all(self) -> None:
        """Shutdown: every request, waiting or running, finishes with "abort"."""
        with self._lock:
            for request in [*self._waiting, *self._running]:
                self._finish(request, FINISH_ABORT)

    def take_touched(self) -> list[Request]:
        """Requests with new output (tokens or their end) since the last call; the output processor emits them."""
        with self._lock:
            touched = list(self._touched.values())
            self._touched.clear()
            return touched

    # ------------------------------------------------------------------ finishing (the one place)
    def _drop_aborted_and_expired(self, now: float) -> None:
        for request in [*self._waiting, *self._running]:
            if request.aborted:
                self._finish(request, FINISH_ABORT)
            elif request.deadline is not None and now >= request.deadline:
                self._finish(request, FINISH_TIMEOUT)

    def _live(self, request_id: str) -> Request | None:
        request = self._requests.get(request_id)
        return None if request is None or request.is_finished else request

    def _finish_id(self, request_id: str, reason: str, error: str | None = None) -> None:
        request = self._live(request_id)
        if request is not None:
            self._finish(request, reason, error)

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        if request.is_finished:
            return
        admitted = request.status is not RequestStatus.WAITING
        request.status = RequestStatus.FINISHED
        request.finish_reason, request.error = reason, error
        self._requests.pop(request.request_id, None)
        if admitted:
            self._running.remove(request)
            self._to_free.append(request.request_id)
        else:
            self._waiting.remove(request)
        self._touched[request.request_id] = request

    # ------------------------------------------------------------------ introspection
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running or self._to_free)

    def next_deadline(self) -> float | None:
        with self._lock:
            deadlines = [r.deadline for r in [*self._waiting, *self._running] if r.deadline is not None]
            return min(deadlines, default=None)


def chunk_end(start: int, end: int, spans: Sequence[tuple[int, int]]) -> int:
    """Where a prefill chunk that may run from `start` to `end` stops so that it cuts no span `[a, b)` of
    `spans`: before the span when the chunk has other tokens before it, else after the whole span (a span
    longer than the budget is still fed in one chunk: progress over the budget)."""
    for a, b in spans:
        if a < end < b:
            return a if a > start else b
    return end
