"""The serving engine: an asyncio front (`generate`) over one background loop thread that runs continuous batching.

    API coroutine ──generate()──► resolve bundle (store) ─► pin prefix (residency, loads in a worker thread)
                                  ─► tokenise (worker thread) ─► Scheduler.add ─► await events
    loop thread: Scheduler.schedule() ─► ModelRunner.prefill(new rows) ─► ModelRunner.decode(all rows)
                 ─► sample, detokenise, emit events ─► drop finished rows

Rows of one forward pass may use different bundles (or none). The loop never waits for a bundle load or for
tokenisation: those happen before a request is queued. Closing `generate`'s iterator aborts the request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from server.engine.bundles import BundleResidency, ResidentBundle
from server.engine.errors import EngineNotReadyError, QueueFullError
from server.engine.preprocess import Preprocessor
from server.engine.runner import ModelRunner, PreparedRow
from server.engine.sampling import make_generator, sample_batch
from server.engine.scheduler import QueueFull, ScheduledSeq, Scheduler
from server.engine.text import IncrementalText
from server.engine.types import GenerationRequest, SamplingParams, StreamEvent

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    """Engine limits. `max_bundles_per_batch=None` lets every row use a different bundle."""

    max_batch_size: int = 16
    max_queue: int = 256
    max_bundles_per_batch: int | None = None
    max_prefill_rows: int = 8
    max_resident_bundles: int = 32
    image_cache_size: int = 256
    request_timeout_s: float | None = 120.0


@dataclass
class LiveSeq:
    """Loop-side state of one admitted or waiting request."""

    request: GenerationRequest
    sched: ScheduledSeq
    row: PreparedRow
    bundle_label: str | None
    text: IncrementalText
    emit: object  # Callable[[StreamEvent], None], thread-safe
    eos_ids: frozenset[int]
    generator: torch.Generator | None
    last_token: int = -1
    first_token_at: float | None = None
    last_token_at: float | None = None
    done: bool = False
    tokens: list[int] = field(default_factory=list)

    @property
    def params(self) -> SamplingParams:
        return self.request.sampling


class Engine:
    """Implements `server.engine.client.EngineClient` on a real model."""

    def __init__(
        self,
        frozen,
        store,
        config: EngineConfig,
        metrics=None,
        bundle_limits=None,
        model_id: str | None = None,
    ):
        self.frozen, self.store, self.config, self.metrics = frozen, store, config, metrics
        self._model_id = model_id or frozen.spec.model_id
        # Bundle errors quote `spec.model_id` to clients: use the served id, never a local path.
        self.spec = dataclasses.replace(frozen.spec, model_id=self._model_id)
        self.bundle_limits = bundle_limits
        self.runner = ModelRunner(frozen, config.image_cache_size, metrics)
        self.scheduler = Scheduler(
            config.max_batch_size, config.max_queue, config.max_bundles_per_batch, config.max_prefill_rows
        )
        self.residency = BundleResidency(self._load_prefix, config.max_resident_bundles, metrics)
        self.preprocessor = Preprocessor(frozen)
        self._seqs: dict[str, LiveSeq] = {}  # every queued or running request (API + loop threads)
        self._running: dict[str, LiveSeq] = {}  # rows of the running batch (loop thread only)
        self._seqs_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ construction and lifecycle
    @classmethod
    def from_settings(cls, settings, metrics=None) -> Engine:
        """Load the model named by `settings.model` and open `settings.store` (blocking; call from the lifespan)."""
        from m2pt.loading import load_frozen_llava
        from server.engine.wiring import (
            engine_config_from_settings,
            open_store_from_settings,
            served_model_id,
        )

        store, limits = open_store_from_settings(settings)  # checks paths before the (slow) model load
        frozen = load_frozen_llava(str(settings.model), device=settings.device, dtype=settings.dtype)
        return cls(
            frozen, store, engine_config_from_settings(settings), metrics, limits, served_model_id(settings)
        )

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

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
        self._stopping.set()
        self.scheduler.wake()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        with self._seqs_lock:
            leftover = list(self._seqs.values())
        for seq in leftover:
            self._finish(seq, "abort")

    # ------------------------------------------------------------------ API side
    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """See `EngineClient.generate`. Raises before the first event for unknown bundles, full queue, bad input."""
        if not self.ready:
            raise EngineNotReadyError("the engine is not running yet; retry when /ready answers 200")
        ref = self.store.resolve(request.bundle) if request.bundle else None
        entry = await self.residency.acquire(ref) if ref is not None else None
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()
        seq: LiveSeq | None = None
        try:
            seq = await self._admit(request, entry, ref, events)
            while True:
                event = await events.get()
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            if seq is not None and not seq.done:
                self.scheduler.abort(request.request_id)
            if entry is not None:
                self.residency.release(entry)

    async def _admit(self, request, entry: ResidentBundle | None, ref, events: asyncio.Queue) -> LiveSeq:
        row = await asyncio.to_thread(self.preprocessor.prepare, request, entry)
        loop = asyncio.get_running_loop()

        def emit(event: StreamEvent) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # event loop already closed (shutdown)
                pass

        timeout = request.timeout_s or self.config.request_timeout_s
        sched = ScheduledSeq(
            request.request_id,
            row.bundle_key,
            deadline=None if not timeout else request.arrival + timeout,
            arrival=request.arrival,
        )
        seq = LiveSeq(
            request=request,
            sched=sched,
            row=row,
            bundle_label=None if ref is None else ref.label,
            text=IncrementalText(self.frozen.processor.tokenizer, request.sampling.stop),
            emit=emit,
            eos_ids=self.preprocessor.eos_ids,
            generator=make_generator(request.sampling, self.frozen.device),
        )
        with self._seqs_lock:
            self._seqs[request.request_id] = seq
        try:
            self.scheduler.add(sched)
        except QueueFull as exc:
            with self._seqs_lock:
                self._seqs.pop(request.request_id, None)
            raise QueueFullError(f"server busy: {exc}; retry later", retry_after_s=1) from exc
        self._set_gauges()
        return seq

    # ------------------------------------------------------------------ loop thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopping.is_set():
            if not self.scheduler.wait_for_work(timeout=0.1):
                continue
            try:
                self.step()
            except Exception:  # a model fault: fail the batch, keep serving
                log.exception("engine step failed; failing the running batch")
                self._fail_running()

    def step(self) -> None:
        """One iteration: drop aborted/expired rows, prefill admitted rows, decode every running row once."""
        out = self.scheduler.schedule()
        for sched in out.aborted:
            self._finish(self._lookup(sched.request_id), "abort")
        for sched in out.expired:
            self._finish(self._lookup(sched.request_id), "timeout")
        admitted = [
            seq for s in out.admit if (seq := self._lookup(s.request_id)) is not None and not seq.done
        ]
        if admitted:
            started = time.perf_counter()
            logits = self.runner.prefill([s.row for s in admitted])
            self._observe_phase("prefill", started)
            self._running.update({s.request.request_id: s for s in admitted})
            self._count_prompt_tokens(admitted)
            self._advance(admitted, logits)
        self._drop_done()
        if self.runner.row_ids:
            running = [self._running[rid] for rid in self.runner.row_ids]
            started = time.perf_counter()
            logits = self.runner.decode([s.last_token for s in running])
            self._observe_phase("decode", started)
            self._advance(running, logits)
            self._drop_done()
        self._set_gauges()

    def _lookup(self, request_id: str) -> LiveSeq | None:
        with self._seqs_lock:
            return self._seqs.get(request_id)

    def _drop_done(self) -> None:
        """Remove finished rows (stop, length, abort, timeout) from the running batch."""
        done = {rid for rid, seq in self._running.items() if seq.done}
        if done:
            self.runner.drop(done)
            for rid in done:
                del self._running[rid]

    def _advance(self, seqs: list[LiveSeq], logits) -> None:
        """Sample one token for each live row of `seqs` (rows of `logits`) and emit it."""
        tokens = sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs])
        now = time.monotonic()
        for seq, token in zip(seqs, tokens):
            if seq.done:
                continue
            self._observe_token(seq, now)
            seq.last_token = token
            if token in seq.eos_ids and not seq.params.ignore_eos:
                self._finish(seq, "stop")
                continue
            seq.tokens.append(token)
            delta = seq.text.push(token)
            if seq.text.stopped:
                self._finish(seq, "stop", delta)
            elif len(seq.tokens) >= seq.params.max_tokens:
                self._finish(seq, "length", delta)
            elif delta:
                seq.emit(self._event(seq, delta, None))

    def _finish(self, seq: LiveSeq | None, reason: str, delta: str = "") -> None:
        if seq is None or seq.done:
            return
        seq.done = True
        tail = delta + (seq.text.flush() if reason in ("stop", "length") else "")
        seq.emit(self._event(seq, tail, reason))
        self.scheduler.finish(seq.request.request_id)
        with self._seqs_lock:
            self._seqs.pop(seq.request.request_id, None)
        if self.metrics is not None:
            label = seq.bundle_label or "none"
            self.metrics.generated_tokens.labels(label).inc(len(seq.tokens))
            self.metrics.finished.labels(label, reason).inc()

    def _fail_running(self) -> None:
        for seq in list(self._running.values()):
            self._finish(seq, "error")
        self._running.clear()
        self.runner.reset()

    # ------------------------------------------------------------------ helpers
    def _event(self, seq: LiveSeq, text: str, finish: str | None) -> StreamEvent:
        return StreamEvent(
            seq.request.request_id,
            text,
            finish,
            int(seq.row.input_ids.shape[0]),
            len(seq.tokens),
            seq.bundle_label,
        )

    def _observe_token(self, seq: LiveSeq, now: float) -> None:
        if self.metrics is not None:
            if seq.first_token_at is None:
                self.metrics.time_to_first_token.observe(now - seq.request.arrival)
            else:
                self.metrics.inter_token_latency.observe(now - seq.last_token_at)
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.last_token_at = now

    def _observe_phase(self, phase: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.step_seconds.labels(phase).observe(time.perf_counter() - started)

    def _count_prompt_tokens(self, seqs: list[LiveSeq]) -> None:
        if self.metrics is not None:
            for seq in seqs:
                self.metrics.prompt_tokens.labels(seq.bundle_label or "none").inc(
                    int(seq.row.input_ids.shape[0])
                )

    def _set_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.scheduler.num_waiting)
            self.metrics.running_batch_size.set(len(self.runner.row_ids))

    def _load_prefix(self, ref):
        """Blocking: read + validate the bundle from the store and precompute its prefix (residency's loader)."""
        loaded = self.store.load(ref, self.spec, self.bundle_limits)
        with torch.inference_mode():
            return self.frozen.family.compute_prefix(self.frozen.model, loaded.prompts)
