"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): any-res tiling, `image_newline`, variable tokens per
image.

The processor cuts each image into a base tile (the whole image resized) plus the tiles of the best grid
resolution from `image_grid_pinpoints`; every tile goes through the ViT like a plain LLaVA image, *under the
image's bundle* (the visual prefix applies to every tile of an image), is projected by the image's projector,
and HF's own `pack_image_features` unpads the grid and appends `image_newline` per row. So an image's token
count depends on its size. `image_newline` is a base parameter (not part of bundles).

Everything else (towers, LLMs, prefix K/V, the LLM forward) is plain LLaVA's, so this adapter reuses it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from m2pt import hf
from m2pt.families.base import ImageInput, UnsupportedModelError
from m2pt.families.llava import LlavaFamily, check_llava_config, check_llava_modules, llava_spec
from m2pt.spec import ModelSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def tiles_of(model: nn.Module, image: ImageInput) -> Tensor:
    """The image's real tiles `[n, 3, H, W]` (the processor pads every image to the batch's largest count)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    cfg = hf.config(model)
    count = image_size_to_num_patches(
        image_size=image.extras["image_sizes"],
        grid_pinpoints=cfg.image_grid_pinpoints,
        patch_size=int(cfg.vision_config.image_size),
    )
    return image.pixel_values[:count]


class LlavaNextFamily(LlavaFamily):
    """Plain LLaVA's prompt math applied per tile, then HF's packing."""

    name = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)

    def model_class(self) -> type[PreTrainedModel]:
        from transformers import LlavaNextForConditionalGeneration

        return LlavaNextForConditionalGeneration

    def check_config(self, config: Any, model_id: str) -> None:
        check_llava_config(config, model_id)
        pinpoints = getattr(config, "image_grid_pinpoints", None)
        if not pinpoints:
            raise UnsupportedModelError(f"{model_id}: LLaVA-NeXT config without image_grid_pinpoints")

    def check_modules(self, model: nn.Module, model_id: str) -> None:
        check_llava_modules(model, model_id)
        newline = getattr(hf.part(model, "model"), "image_newline", None)
        width = int(hf.config(model).text_config.hidden_size)
        if not isinstance(newline, Tensor) or tuple(newline.shape) != (width,):
            raise UnsupportedModelError(f"{model_id}: image_newline missing or not [llm_dim]")

    def spec_from_model(self, model: nn.Module, model_id: str) -> ModelSpec:
        """Plain LLaVA's spec (`num_image_tokens` per tile) + the pinpoints, which decide the packing."""
        spec = llava_spec(model, model_id)
        pinpoints = [[int(v) for v in p] for p in hf.config(model).image_grid_pinpoints]
        return ModelSpec(
            **{**spec.__dict__, "family": self.name, "extras": {"image_grid_pinpoints": pinpoints}}
        )

    def split_images(self, encoded: Mapping[str, Any]) -> list[ImageInput]:
        """Each image's tile stack `[max_tiles, 3, H, W]` (padded; `encode_images` trims), its `[2]` size."""
        return [
            ImageInput(px, {"image_sizes": size})
            for px, size in zip(encoded["pixel_values"], encoded["image_sizes"], strict=True)
        ]

    def tiles(self, model: nn.Module, image: ImageInput) -> Tensor:
        """The tiles of `image` that the tower runs, `[n, 3, H, W]`."""
        return tiles_of(model, image)

    def pack_kwargs(self, model: nn.Module) -> dict[str, Any]:
        """The family's own arguments of HF's `pack_image_features` (besides features, sizes, newline)."""
        return {"vision_feature_select_strategy": hf.config(model).vision_feature_select_strategy}

    def encode_images(
        self, model: nn.Module, images: Sequence[ImageInput], prefixes: Sequence[Any]
    ) -> list[Tensor]:
        """Every tile of an image runs under that image's bundle; then HF's own packing of the model class
        (unpad + `image_newline`, and for OneVision `anyres_max` pooling) makes each image's features."""
        from m2pt.forward import encode_images

        if not images:
            return []
        device = next(model.parameters()).device
        tiles = [self.tiles(model, im) for im in images]
        counts = [int(t.shape[0]) for t in tiles]
        tile_prefixes = [p for p, n in zip(prefixes, counts, strict=True) for _ in range(n)]
        features = encode_images(model, torch.cat(tiles).to(device), tile_prefixes)  # [sum n, N, D]
        sizes = torch.stack([torch.as_tensor(im.extras["image_sizes"]) for im in images])  # [M, 2]
        inner: Any = hf.part(model, "model")
        packed, _ = inner.pack_image_features(
            list(torch.split(features, counts)),
            sizes,
            image_newline=inner.image_newline,
            **self.pack_kwargs(model),
        )
        return list(packed)  # M x [N_i, D]


LLAVA_NEXT = LlavaNextFamily()
