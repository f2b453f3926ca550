"""The one record of a request inside the engine. The scheduler owns it (creates its place in the queue, moves
it through the states, finishes it); the runner sees only its id and `row`; the output processor keeps its
detokenisation state in it. Pure Python, no torch."""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from server.engine.types import PreparedRow, SamplingParams, StreamEvent


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, nothing computed yet
    PREFILLING = "prefilling"  # admitted: images encoded and/or part of the prompt in the cache
    DECODING = "decoding"  # the whole prompt is in the cache; one token per step
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Everything the engine knows about one request. Mutated only on the engine loop thread, except `aborted`
    (set by `Scheduler.abort` from any thread, read at the next `schedule()`)."""

    request_id: str
    row: PreparedRow
    sampling: SamplingParams
    bundle_key: Hashable  # the bundle's content hash, or "base"
    bundle_label: str | None  # "name@version", None for the base model
    eos_ids: frozenset[int]
    emit: Callable[[StreamEvent], None]  # thread-safe delivery to the waiting client
    arrival: float
    deadline: float | None = None  # clock value; None = no deadline
    status: RequestStatus = RequestStatus.WAITING
    images_encoded: bool = False
    num_computed_tokens: int = 0  # prompt tokens already in the cache
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    aborted: bool = False
    detok: Any = None  # the output processor's state (`IncrementalText`)
    pending_text: str = ""  # text decoded this step, not yet emitted
    first_token_at: float | None = None
    last_token_at: float | None = None
    observed_at: float | None = None  # the output processor's clock at the last token (latency metrics)

    @property
    def num_prompt_tokens(self) -> int:
        return self.row.num_tokens

    @property
    def needs_encode(self) -> bool:
        return self.row.num_image_tokens > 0 and not self.images_encoded

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
