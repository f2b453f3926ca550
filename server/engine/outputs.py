"""The output processor: incremental detokenisation, stop-string detection and the events a client receives.

The scheduler calls `push` for every generated token (so it can finish a request on a stop string in the same
step); after each step the engine calls `emit` for every request the scheduler touched. Knows no model and no
scheduling; the tokenizer is any object with `decode(ids, skip_special_tokens=True)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from server.engine.request import Request
from server.engine.text import IncrementalText
from server.engine.types import FINISH_LENGTH, FINISH_STOP, StreamEvent


class OutputProcessor:
    def __init__(self, tokenizer, metrics=None, clock: Callable[[], float] = time.monotonic) -> None:
        self._tokenizer = tokenizer
        self._metrics = metrics
        self._clock = clock

    def start(self, request: Request) -> None:
        """Give a new request its detokenisation state (before it is queued)."""
        request.detok = IncrementalText(self._tokenizer, request.sampling.stop)

    def push(self, request: Request, token: int) -> bool:
        """Detokenise one generated token into `request.pending_text`; True when a stop string appeared."""
        self._observe_token(request)
        request.pending_text += request.detok.push(token)
        return bool(request.detok.stopped)

    def emit(self, request: Request) -> None:
        """Send the text decoded since the last emit (and, for a finished request, the final event)."""
        text, request.pending_text = request.pending_text, ""
        finished = request.finish_reason is not None
        if request.finish_reason in (FINISH_STOP, FINISH_LENGTH) and request.detok is not None:
            text += request.detok.flush()
        if not text and not finished:
            return
        request.emit(
            StreamEvent(
                request.request_id,
                text,
                request.finish_reason,
                request.num_prompt_tokens,
                len(request.output_ids),
                request.bundle_label,
                request.error,
            )
        )
        if finished:
            self._observe_finish(request)

    def _observe_token(self, request: Request) -> None:
        if self._metrics is None:
            return
        now = self._clock()
        if request.observed_at is None:
            self._metrics.time_to_first_token.observe(now - request.arrival)
        else:
            self._metrics.inter_token_latency.observe(now - request.observed_at)
        request.observed_at = now

    def _observe_finish(self, request: Request) -> None:
        if self._metrics is not None:
            label = request.bundle_label or "none"
            self._metrics.generated_tokens.labels(label).inc(len(request.output_ids))
            self._metrics.finished.labels(label, request.finish_reason).inc()
