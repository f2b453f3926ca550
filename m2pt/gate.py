"""The last step of the startup gate: one real prefill through the family's own forward before a model is
used.

A checkpoint can pass the config and weight checks and still fail at its first request (a processor that does
not match the model, a placeholder count the tower does not produce). `smoke_prefill` runs a blank image and the
family's smoke text through processor -> `split_images` -> `encode_images` -> `prefill` and checks the logits,
so such a model fails at startup with a message instead of at the first user request.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from m2pt.families.base import UnsupportedModelError

log = logging.getLogger(__name__)


class SmokeTestError(UnsupportedModelError):
    """The one-row smoke prefill failed or produced unusable logits."""


def blank_image(size: int) -> Any:
    from PIL import Image

    return Image.new("RGB", (size, size), (0, 0, 0))


def smoke_inputs(frozen: Any) -> tuple[torch.Tensor, list[Any]]:
    """The smoke prompt of a `FrozenLlava`: the family's smoke text with one blank image, through the model's
    processor. Returns its input ids [T] and the family's per-image inputs."""
    text = frozen.family.smoke_text(frozen.processor)
    image = blank_image(frozen.spec.image_size)
    encoded = frozen.processor(images=[image], text=text, return_tensors="pt")
    return encoded["input_ids"][0], list(frozen.family.split_images(encoded))


def smoke_prefill(frozen: Any) -> None:
    """Raise `SmokeTestError` unless a blank-image prefill gives finite `[1, vocab]` logits (a
    `FrozenLlava`)."""
    from m2pt.forward import RowInput

    family, model, spec = frozen.family, frozen.model, frozen.spec
    try:
        with torch.inference_mode():
            input_ids, images = smoke_inputs(frozen)
            features = family.encode_images(model, images, [None] * len(images))
            row = RowInput(input_ids, torch.cat(features), None, tuple(images))
            logits, _ = family.prefill(model, [row])
    except Exception as exc:  # any failure here means the model cannot serve: report it, do not serve
        raise SmokeTestError(f"{spec.model_id}: the startup smoke prefill failed: {exc}") from exc
    vocab = model.get_output_embeddings().weight.shape[0]
    if tuple(logits.shape) != (1, vocab) or not bool(torch.isfinite(logits).all()):
        raise SmokeTestError(
            f"{spec.model_id}: the startup smoke prefill gave logits of shape {tuple(logits.shape)} "
            f"(expected (1, {vocab})) or non-finite values"
        )
    log.info("startup smoke prefill passed for %s", spec.model_id)
