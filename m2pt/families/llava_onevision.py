"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP tower, Qwen2 LLM, any-res tiles with
`image_newline`, and OneVision's own packing (`anyres_max_N`: the unpadded tile grid is bilinearly pooled
down when it exceeds N tiles' worth of features). Images only: videos are refused by the processor.

The prompt math is LLaVA-NeXT's (itself plain LLaVA's): every tile of an image runs through the ViT *under the
image's bundle*, is projected by the image's projector, and HF's `LlavaOnevisionModel.pack_image_features`
unpads, pools and appends `image_newline`. Token counts vary with the image size.

Multi-image samples: HF's processor tiles an image only when its sample holds one image (a nested image list
with n > 1 per sample gives the base tile only, padded to a square). `split_images` records that per image in
`extras["tiled"]` (from `batch_num_images`), so `encode_images` matches HF in both cases. (A flat image list,
which the server and trainer pass, tiles every image.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from m2pt import hf
from m2pt.families.base import ImageInput, UnsupportedModelError
from m2pt.families.llava import check_llava_config, llava_spec
from m2pt.families.llava_next import LlavaNextFamily, tiles_of
from m2pt.spec import ModelSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def onevision_tiles(model: nn.Module, image: ImageInput) -> Tensor:
    """The image's real tiles `[n, 3, H, W]`: base + grid when tiled (as NeXT counts them), else the base tile
    alone."""
    if not bool(image.extras.get("tiled", True)):
        return image.pixel_values[:1]
    return tiles_of(model, image)


def _tiled_flags(encoded: Mapping[str, Any], n_images: int) -> list[bool]:
    """Per image: does HF tile it (its sample holds exactly one image)?"""
    per_sample = encoded.get("batch_num_images")
    if per_sample is None:
        return [True] * n_images
    flags = [int(n) == 1 for n in per_sample for _ in range(int(n))]
    if len(flags) != n_images:
        raise ValueError(f"batch_num_images {list(per_sample)} does not add up to {n_images} images")
    return flags


class LlavaOnevisionFamily(LlavaNextFamily):
    """LLaVA-NeXT's per-tile prompt math with OneVision's packing and its image-only processor."""

    name = "llava_onevision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)

    def model_class(self) -> type[PreTrainedModel]:
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def load_processor(self, name_or_path: str) -> Any:
        from m2pt.families.llava_onevision_processor import load_processor

        return load_processor(name_or_path)

    def check_config(self, config: Any, model_id: str) -> None:
        check_llava_config(config, model_id)
        if not getattr(config, "image_grid_pinpoints", None):
            raise UnsupportedModelError(f"{model_id}: LLaVA-OneVision config without image_grid_pinpoints")
        ratio = str(getattr(config, "vision_aspect_ratio", ""))
        if not (ratio.startswith("anyres_max_") and ratio.removeprefix("anyres_max_").isdigit()):
            raise UnsupportedModelError(f"{model_id}: vision_aspect_ratio {ratio!r} is not anyres_max_<N>")

    def spec_from_model(self, model: nn.Module, model_id: str) -> ModelSpec:
        """Plain LLaVA's spec (`num_image_tokens` per tile) + the pinpoints and pooling limit (packing)."""
        spec = llava_spec(model, model_id)
        cfg = hf.config(model)
        extras = {
            "image_grid_pinpoints": [[int(v) for v in p] for p in cfg.image_grid_pinpoints],
            "vision_aspect_ratio": str(cfg.vision_aspect_ratio),
        }
        return ModelSpec(**{**spec.__dict__, "family": self.name, "extras": extras})

    def split_images(self, encoded: Mapping[str, Any]) -> list[ImageInput]:
        """Each image's tile stack `[max_tiles, 3, H, W]` (padded; `encode_images` trims), its `[2]` size and
        whether HF tiles it (`tiled`, a bool tensor)."""
        pixels, sizes = encoded["pixel_values"], encoded["image_sizes"]
        flags = _tiled_flags(encoded, len(pixels))
        return [
            ImageInput(px, {"image_sizes": size, "tiled": torch.tensor(flag)})
            for px, size, flag in zip(pixels, sizes, flags, strict=True)
        ]

    def tiles(self, model: nn.Module, image: ImageInput) -> Tensor:
        return onevision_tiles(model, image)

    def pack_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """`LlavaOnevisionModel.pack_image_features`: unpad + `anyres_max` pooling + newline."""
        return {"vision_aspect_ratio": hf.config(model).vision_aspect_ratio}


LLAVA_ONEVISION = LlavaOnevisionFamily()
