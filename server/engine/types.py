"""Plain data passed between the HTTP layer and the engine, and between the engine's parts. No torch import here:
the API layer and the torch-free core tests import this without a model (tensor fields are typed `Any`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

# The closed set of finish reasons. "error" never reaches a client as a success: the API layer turns it into a
# 5xx JSON error (or an SSE error event before `[DONE]` once a stream has started).
FINISH_STOP = "stop"  # an EOS token or a stop string
FINISH_LENGTH = "length"  # max_tokens generated
FINISH_TIMEOUT = "timeout"  # the request's deadline passed
FINISH_ABORT = "abort"  # the client went away, or the server stopped
FINISH_ERROR = "error"  # the model failed on this request (StreamEvent.error says how)
FINISH_REASONS = frozenset({FINISH_STOP, FINISH_LENGTH, FINISH_TIMEOUT, FINISH_ABORT, FINISH_ERROR})


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


@dataclass
class PreparedRow:
    """A request after tokenisation and validation: what the model needs to prefill it (built by
    `server.engine.preprocess.Preprocessor`, consumed by the runner). `num_image_tokens` placeholders in
    `input_ids` are filled by the features of `pixel_values`, one block per image in order."""

    request_id: str
    input_ids: Any  # torch.Tensor [T] long, image placeholders expanded
    pixel_values: Any  # torch.Tensor [n_images, 3, H, W] or None
    image_keys: list[str]  # content hash of each image
    prefix: Any  # m2pt.prefix.BundlePrefix or None
    bundle_key: str  # bundle content hash, or "base"
    num_image_tokens: int = 0
    images: list[Any] | None = None  # a model family's per-image inputs (`family.split_images`), else None
    atomic_spans: tuple[tuple[int, int], ...] = ()  # token ranges a prefill chunk must not cut (sorted)
    encode_cost: int | None = None  # the images' encode in step-budget tokens (None: num_image_tokens)

    @property
    def image_encode_cost(self) -> int:
        """What encoding this row's images takes from a step's token budget."""
        return self.num_image_tokens if self.encode_cost is None else self.encode_cost

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class StreamEvent:
    """A piece of output. The last event of a request has `finish_reason` set (one of `FINISH_REASONS`) and
    carries the final usage counts; with "error", `error` says what failed. `bundle` is the resolved
    "name@version" or None."""

    request_id: str
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    bundle: str | None
    error: str | None = None
