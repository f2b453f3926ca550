"""Plain data passed between the HTTP layer and the engine. No torch here: the API layer and the scheduler
tests import this without a model."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy; `seed` makes sampling reproducible per request;
    `ignore_eos` keeps generating to `max_tokens` (fixed-length benchmarks and tests, as in vLLM)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    """One chat turn to complete.

    `messages` are in Hugging Face chat format: `{"role": "user"|"assistant"|"system",
    "content": [{"type": "image"} | {"type": "text", "text": str}, ...]}`; `images` holds the decoded PIL images,
    one per `{"type": "image"}` part, in order. `bundle` is "name", "name@version" or None (the base model).
    """

    request_id: str
    messages: list[dict[str, Any]]
    images: list[Any]  # PIL.Image.Image
    bundle: str | None
    sampling: SamplingParams
    timeout_s: float | None = None
    arrival: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class StreamEvent:
    """A piece of output. The last event of a request has `finish_reason` set ("stop", "length", "timeout",
    "abort") and carries the final usage counts. `bundle` is the resolved "name@version" or None."""

    request_id: str
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    bundle: str | None
