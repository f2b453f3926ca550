"""Startup measurement for the serving scheduler: what encoding an image costs against one prompt token.

The scheduler's per-step token budget counts an image encode as `ceil(placeholders * ratio)` prompt tokens. A
ratio from parameter counts misses what a FLOP count does not see (a ViT's narrower matmuls run at a lower
rate; its attention spans every patch), and on the benchmark model it undercounted an encode by a third, so
steps with an image ran long. Measuring it on the served model, on its device, is what the budget needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from m2pt.gate import smoke_inputs

log = logging.getLogger(__name__)


def _best_seconds(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Best-of-`repeats` wall time of `fn` after one warm-up call (synchronising CUDA around it)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def encode_cost_per_placeholder(frozen: Any, repeats: int = 3) -> float:
    """Seconds to encode the smoke image per placeholder it fills, over seconds of prefill per prompt token of
    the smoke prompt (a `FrozenLlava` with its family; the base model, no bundle). About 1 s of work for a
    190 M model on 2 CPU cores."""
    from m2pt.forward import RowInput

    family, model, spec = frozen.family, frozen.model, frozen.spec
    with torch.inference_mode():
        input_ids, images = smoke_inputs(frozen)  # [T], the family's per-image inputs

        def encode() -> list[torch.Tensor]:
            return list(family.encode_images(model, images, [None] * len(images)))

        row = RowInput(input_ids, torch.cat(encode()), None, tuple(images))
        encode_s = _best_seconds(encode, repeats, frozen.device)
        prefill_s = _best_seconds(lambda: family.prefill(model, [row]), repeats, frozen.device)
    placeholders = int((input_ids == spec.image_token_id).sum())
    ratio = (encode_s / max(1, placeholders)) / (prefill_s / len(input_ids))
    log.info(
        "image encode: %.1f ms for %d placeholders, prefill %.2f ms per token: an encode costs %.3f prompt "
        "tokens per placeholder in the step budget",
        encode_s * 1e3,
        placeholders,
        prefill_s * 1e3 / len(input_ids),
        ratio,
    )
    return ratio
