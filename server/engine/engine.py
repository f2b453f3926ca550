"""The serving engine: an asyncio front (`generate`) over one background loop thread running `step()`.

    API coroutine ──generate()──► resolve bundle (store) ─► pin prefix (residency: read in a worker, prefix on the loop)
                                  ─► tokenise + validate (worker thread; 400s here) ─► Scheduler.add ─► events
    loop thread:  step() = scheduler.schedule() ─► runner.execute(out) ─► scheduler.update_from_output(out, res)
                           ─► output processor emits every touched request's text / final event

The scheduler owns each request's record and decides every way it ends; the runner owns tensors; the output
processor detokenises. All collaborators are injected (`server.engine.factory.build_engine` builds the real
ones). A model fault fails only the requests it hit (finish reason "error"); faults are counted, and
`fault_threshold` of them within `fault_window_s` make `ready` False until the window passes. When nothing can
run, the loop blocks until a request arrives, is aborted, or a deadline passes (no busy loop).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from server.engine.config import EngineConfig
from server.engine.errors import EngineNotReadyError
from server.engine.outputs import OutputProcessor
from server.engine.request import Request
from server.engine.scheduler import RunnerOutput, Scheduler, SchedulerOutput
from server.engine.types import GenerationRequest, StreamEvent

if TYPE_CHECKING:
    from server.engine.bundles import BundleResidency

log = logging.getLogger(__name__)

IDLE_WAIT_S = 1.0  # longest sleep when nothing can run (deadlines wake the loop earlier)
FAULT_MESSAGE = "the engine failed while running this request"


class Engine:
    """Implements `server.engine.client.EngineClient`. `runner` needs `execute(out) -> RunnerOutput` and
    `reset()`; `preprocessor` needs `prepare(request, entry) -> PreparedRow` and `eos_ids`."""

    def __init__(
        self,
        *,
        config: EngineConfig,
        scheduler: Scheduler,
        runner: Any,
        preprocessor: Any,
        outputs: OutputProcessor,
        residency: BundleResidency | None,
        store: Any,
        model_id: str,
        spec: Any = None,
        bundle_limits: Any = None,
        metrics: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config, self.scheduler, self.runner = config, scheduler, runner
        self.preprocessor, self.outputs, self.residency = preprocessor, outputs, residency
        self.store, self.spec, self.bundle_limits, self.metrics = store, spec, bundle_limits, metrics
        self._model_id = model_id
        self._clock = clock
        self._faults: deque[float] = deque()
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._jobs_lock = threading.Lock()
        self._steps = 0
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    @property
    def ready(self) -> bool:
        """The loop runs and fewer than `fault_threshold` faults happened in the last `fault_window_s`."""
        alive = self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()
        return alive and self.recent_faults() < self.config.fault_threshold

    @property
    def base_model_id(self) -> str:
        return self._model_id

    async def start(self) -> None:
        """Start the loop thread."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="m2pt-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the loop; requests still in flight end with finish_reason "abort"."""
        with self._jobs_lock:
            self._stopping.set()
        self.scheduler.wake()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        self._drain_jobs()
        self.scheduler.abort_all()
        self._emit_touched()

    def abort(self, request_id: str) -> None:
        """Abort a request (it ends with "abort" at the next step); closing `generate`'s iterator does the same."""
        self.scheduler.abort(request_id)

    def stats(self) -> dict[str, Any]:
        return {
            "waiting": self.scheduler.num_waiting,
            "running": self.scheduler.num_running,
            "steps": self._steps,
            "recent_faults": self.recent_faults(),
            "ready": self.ready,
        }

    def recent_faults(self) -> int:
        horizon = self._clock() - self.config.fault_window_s
        while self._faults and self._faults[0] < horizon:
            self._faults.popleft()
        return len(self._faults)

    # ------------------------------------------------------------------ API side
    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """See `EngineClient.generate`. Raises before the first event for unknown bundles, a full queue and every
        input the model cannot take (400s); a model failure ends the stream with finish_reason "error"."""
        if not self.ready:
            raise EngineNotReadyError(
                "the engine is not running or is failing; retry when /ready answers 200"
            )
        ref = self.store.resolve(request.bundle) if request.bundle else None
        entry = await self.residency.acquire(ref) if ref is not None and self.residency is not None else None
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        record: Request | None = None
        try:
            row = await asyncio.to_thread(self.preprocessor.prepare, request, entry)
            record = self._record(request, row, None if ref is None else ref.label, events)
            self.scheduler.add(record)
            self._set_gauges()
            while True:
                event = await events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if record is not None and not record.is_finished:
                self.scheduler.abort(request.request_id)
            if entry is not None and self.residency is not None:
                self.residency.release(entry)

    def _record(self, request: GenerationRequest, row, label: str | None, events: asyncio.Queue) -> Request:
        loop = asyncio.get_running_loop()

        def emit(event: StreamEvent) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed (shutdown)
                pass

        timeout = request.timeout_s or self.config.request_timeout_s
        record = Request(
            request_id=request.request_id,
            row=row,
            sampling=request.sampling,
            bundle_key=row.bundle_key,
            bundle_label=label,
            eos_ids=self.preprocessor.eos_ids,
            emit=emit,
            arrival=request.arrival,
            deadline=None if not timeout else request.arrival + timeout,
        )
        self.outputs.start(record)
        return record

    def call_in_loop(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn` on the engine loop thread between two steps (at most one such call per step); thread-safe.

        For model work outside requests (a cold bundle's prefix): on the loop thread it runs alone on the cores,
        where a worker thread would run its torch work beside the step's and stretch every running stream's
        step. Runs at once, on the calling thread, when the loop is not running."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._jobs_lock:
            queued = self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()
            if queued:
                self._jobs.append((fn, future))
        if queued:
            self.scheduler.wake()
        else:
            _run_into(fn, future)
        return future

    # ------------------------------------------------------------------ loop thread
    def _loop(self) -> None:
        while not self._stopping.is_set():
            worked = self.step()
            ran_job = self._run_one_job()
            if not worked and not ran_job:
                self.scheduler.wait_for_change(self._idle_timeout())
        self._drain_jobs()

    def _drain_jobs(self) -> None:
        """Stopping: run what is queued (nothing may wait forever on a job; later calls run inline)."""
        with self._jobs_lock:
            jobs, self._jobs = list(self._jobs), deque()
        for job in jobs:
            _run_into(*job)

    def _run_one_job(self) -> bool:
        if not self._jobs:
            return False
        _run_into(*self._jobs.popleft())
        return True

    def _idle_timeout(self) -> float:
        deadline = self.scheduler.next_deadline()
        if deadline is None:
            return IDLE_WAIT_S
        return min(IDLE_WAIT_S, max(0.0, deadline - self._clock()) + 0.001)

    def step(self) -> bool:
        """One engine step; False when there was nothing to do (the caller may then wait)."""
        out = self.scheduler.schedule()
        if out.is_empty:
            self._emit_touched()  # requests that finished while waiting (aborted, expired)
            return False
        started = time.perf_counter()
        result = self._execute(out)
        self.scheduler.update_from_output(out, result)
        self._emit_touched()
        self._steps += 1
        self._observe_step(out, started)
        return True

    def _execute(self, out: SchedulerOutput) -> RunnerOutput:
        try:
            result = self.runner.execute(out)
        except Exception:
            log.exception("engine step failed; failing every admitted request")
            self._record_fault("step")
            self.runner.reset()
            self.scheduler.fail_running(FAULT_MESSAGE)
            return RunnerOutput()
        if result.failed:
            self._record_fault("row", len(result.failed))
        return result

    def _emit_touched(self) -> None:
        for record in self.scheduler.take_touched():
            self.outputs.emit(record)
        self._set_gauges()

    def _record_fault(self, scope: str, count: int = 1) -> None:
        self._faults.append(self._clock())
        if self.metrics is not None:
            self.metrics.engine_faults.labels(scope).inc(count)

    # ------------------------------------------------------------------ metrics
    def _observe_step(self, out: SchedulerOutput, started: float) -> None:
        if self.metrics is None:
            return
        phase = "prefill" if (out.chunks or out.encode) else "decode"
        self.metrics.step_seconds.labels(phase).observe(time.perf_counter() - started)
        self.metrics.step_tokens.observe(out.num_scheduled_tokens)
        prompt_tokens: dict[str, int] = {}
        for chunk in out.chunks:
            label = chunk.bundle_label or "none"
            prompt_tokens[label] = prompt_tokens.get(label, 0) + chunk.end - chunk.start
        for label, n in prompt_tokens.items():
            self.metrics.prompt_tokens.labels(label).inc(n)

    def _set_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.scheduler.num_waiting)
            self.metrics.running_batch_size.set(self.scheduler.num_running)


def _run_into(fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
    """Run `fn`, putting its result or exception into `future` (unless it was cancelled)."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:  # the caller gets it from the future
        future.set_exception(exc)
