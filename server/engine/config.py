"""The engine's own configuration (no pydantic, no settings import): `server.engine_settings` maps the server's
`Settings` onto it at the edge; tests and other front ends (Ray Serve replicas) build it directly."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_NUM_BATCHED_TOKENS = 128


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits.

    - `max_batch_size`: requests in flight on the model at once (decoding or being prefilled).
    - `max_num_batched_tokens`: the per-step token budget shared by decode rows (1 each) and new work (prompt
      chunks; an image encode costs its placeholder tokens scaled by `m2pt.calibrate`, measured at startup).
      Running rows decode every step; prompts are prefilled in chunks of what is left. Must be ≥
      `max_batch_size` so every running row can decode.
    - `max_bundles_per_batch`: distinct bundles among requests in flight (None = unlimited; 1 = one bundle per
      step, vLLM `--max-loras 1`).
    - `fault_threshold` faults within `fault_window_s` seconds make the engine not ready (`/ready` 503).
    """

    max_batch_size: int = 16
    max_queue: int = 256
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_bundles_per_batch: int | None = None
    max_resident_bundles: int = 32
    image_cache_size: int = 256
    request_timeout_s: float | None = 120.0
    fault_threshold: int = 3
    fault_window_s: float = 60.0

    def __post_init__(self) -> None:
        if min(self.max_batch_size, self.max_queue, self.max_num_batched_tokens, self.fault_threshold) < 1:
            raise ValueError("max_batch_size, max_queue, max_num_batched_tokens, fault_threshold must be ≥ 1")
        if self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_batch_size "
                f"({self.max_batch_size}): every running row decodes one token per step"
            )
