"""Qwen2.5-VL and Qwen3-VL (`Qwen2_5_VLForConditionalGeneration`, `Qwen3VLForConditionalGeneration`) behind the
`ModelFamily` interface. One implementation of the prompt math is shared by both (and by training and serving):

- visual prompts: a per-block K/V prefix of every attention chunk of every image, no RoPE (`qwen_vl_vision`);
- textual prompts: a per-layer KV prefix at M-RoPE positions (i, i, i), real tokens shifted by Lt (`qwen_vl_text`);
- projector: `visual.merger` (+ `visual.deepstack_merger_list` in Qwen3-VL), keys relative to `model.model.visual`;
- images: one `ImageInput` per image, pixel layout `[patches, C*t*p*p]`, extras `image_grid_thw` `[3]`; sizes vary.
Bundle shapes: text `[llm_layers, Lt, llm_dim]`, visual `[vision depth, Lv, vision hidden]`. Processors load
without torchvision (`qwen_vl_processor`). Videos are not supported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from m2pt.families.base import ImageInput, ModelFamily, UnsupportedModelError
from m2pt.families.qwen_vl_encode import encode_images_qwen2_5, encode_images_qwen3
from m2pt.families.qwen_vl_vision import ImageFeatures, projector_state, visual_block_kv
from m2pt.forward import DecodeState, RowInput
from m2pt.prefix import BundlePrefix, text_layer_kv
from m2pt.prompts import PromptTensors
from m2pt.spec import ModelSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

GRID_KEY = "image_grid_thw"


def _require(ok: bool, model_id: str, what: str) -> None:
    if not ok:
        raise UnsupportedModelError(f"{model_id}: {what}")


class Projector(nn.Module):
    """A view of the vision→LLM connectors (merger + deepstack mergers) as one module for `state_dict()`."""

    def __init__(self, visual: Any) -> None:
        super().__init__()
        self.merger = visual.merger
        if hasattr(visual, "deepstack_merger_list"):
            self.deepstack_merger_list = visual.deepstack_merger_list


class QwenVLFamily(ModelFamily):
    """Qwen2.5-VL (`windowed=True`) or Qwen3-VL (deepstack)."""

    def __init__(self, name: str, architecture: str, model_type: str) -> None:
        self.name = name
        self.architectures = (architecture,)
        self.model_type = model_type

    def model_class(self) -> type[PreTrainedModel]:
        import transformers

        cls: type[PreTrainedModel] = getattr(transformers, self.architectures[0])
        return cls

    def check_config(self, config: Any, model_id: str) -> None:
        _require(config.model_type == self.model_type, model_id, f"model_type {config.model_type!r}")
        vcfg = config.vision_config
        head_dim = vcfg.hidden_size // vcfg.num_heads
        _require(head_dim % 4 == 0, model_id, f"vision head dim {head_dim} is not a multiple of 4 (2-D RoPE)")

    def check_modules(self, model: Any, model_id: str) -> None:
        visual = model.model.visual
        _require(
            len(visual.blocks) == model.config.vision_config.depth, model_id, "vision block count != depth"
        )
        for i, block in enumerate(visual.blocks):
            qkv = getattr(block.attn, "qkv", None)
            if not isinstance(qkv, nn.Linear):
                raise UnsupportedModelError(f"{model_id}: vision block {i} has no fused qkv linear")
            _require(
                qkv.out_features == 3 * qkv.in_features, model_id, f"vision block {i} qkv is not 3 x dim"
            )
            _require(hasattr(block, "norm1") and hasattr(block, "norm2"), model_id, f"vision block {i} norms")
        lm = model.model.language_model
        _require(hasattr(lm, "rotary_emb") and hasattr(lm, "layers"), model_id, "the LLM has no rotary_emb")
        _require(hasattr(model.model, "get_rope_index"), model_id, "the model has no get_rope_index")

    def spec_from_model(self, model: Any, model_id: str) -> ModelSpec:
        """Image size and token count vary per image (`image_grid_thw`): `image_size` is the smallest image side
        the processor makes (one merged unit), `num_image_tokens` is 0 (variable)."""
        cfg = model.config
        vcfg, tcfg = cfg.vision_config, cfg.text_config
        return ModelSpec(
            model_id=model_id,
            vit_layers=vcfg.depth,
            vit_dim=vcfg.hidden_size,
            vit_heads=vcfg.num_heads,
            llm_layers=tcfg.num_hidden_layers,
            llm_dim=tcfg.hidden_size,
            llm_heads=tcfg.num_attention_heads,
            llm_kv_heads=tcfg.num_key_value_heads or tcfg.num_attention_heads,
            llm_head_dim=getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads,
            vocab_size=tcfg.vocab_size,
            image_token_id=cfg.image_token_id,
            image_size=vcfg.patch_size * vcfg.spatial_merge_size,
            patch_size=vcfg.patch_size,
            num_image_tokens=0,
            projector_shapes={k: tuple(v.shape) for k, v in projector_state(model).items()},
            family=self.name,
            extras=self.spec_extras(cfg),
        )

    def spec_extras(self, config: Any) -> dict[str, Any]:
        """Facts that change what a bundle's prompts mean: which blocks window, where deepstack taps, M-RoPE."""
        vcfg, tcfg = config.vision_config, config.text_config
        rope = dict(getattr(tcfg, "rope_parameters", None) or {})
        extras: dict[str, Any] = {
            "spatial_merge_size": int(vcfg.spatial_merge_size),
            "temporal_patch_size": int(vcfg.temporal_patch_size),
            "mrope_section": [int(x) for x in rope.get("mrope_section", [])],
            "mrope_interleaved": bool(rope.get("mrope_interleaved", False)),
        }
        if self.model_type == "qwen2_5_vl":
            extras["window_size"] = int(vcfg.window_size)
            extras["fullatt_block_indexes"] = [int(i) for i in vcfg.fullatt_block_indexes]
        else:
            extras["deepstack_visual_indexes"] = [int(i) for i in vcfg.deepstack_visual_indexes]
        return extras

    def projector(self, model: Any) -> nn.Module:
        return Projector(model.model.visual)

    def compute_prefix(self, model: Any, prompts: PromptTensors) -> BundlePrefix:
        """Per-layer K/V (text: RoPE at (i, i, i); visual: no RoPE), on the model's device/dtype; differentiable."""
        ref = next(model.parameters())
        cast = {"device": ref.device, "dtype": ref.dtype}
        text_k = text_v = visual_k = visual_v = None
        if prompts.text is not None:
            pairs = [text_layer_kv(model, i, p.to(**cast)) for i, p in enumerate(prompts.text)]
            text_k, text_v = torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])
        if prompts.visual is not None:
            pairs = [visual_block_kv(model, i, p.to(**cast)) for i, p in enumerate(prompts.visual)]
            visual_k, visual_v = torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])
        projector = (
            None if prompts.projector is None else {k: v.to(**cast) for k, v in prompts.projector.items()}
        )
        return BundlePrefix(text_k, text_v, visual_k, visual_v, projector)

    def split_images(self, encoded: Mapping[str, Any]) -> list[ImageInput]:
        grids = encoded.get(GRID_KEY)
        if grids is None:
            return []
        sizes = grids.prod(-1).tolist()
        pixels = torch.split(encoded["pixel_values"], sizes)
        return [ImageInput(px, {GRID_KEY: g}) for px, g in zip(pixels, grids, strict=True)]

    def image_features(
        self, model: Any, images: Sequence[ImageInput], prefixes: Sequence[BundlePrefix | None]
    ) -> list[ImageFeatures]:
        """Each image's merged (and deepstack) features under its bundle."""
        if not images:
            return []
        device = next(model.parameters()).device
        pixels = torch.cat([im.pixel_values for im in images]).to(device)  # [sum patches, C*t*p*p]
        grid = torch.stack([im.extras[GRID_KEY].reshape(3) for im in images]).to(device)  # [M, 3]
        run = encode_images_qwen3 if self.model_type == "qwen3_vl" else encode_images_qwen2_5
        return run(model, pixels, grid, prefixes)

    def encode_images(
        self, model: Any, images: Sequence[ImageInput], prefixes: Sequence[BundlePrefix | None]
    ) -> list[Tensor]:
        """Image i -> `[N_i, D]` (Qwen2.5-VL) or `[N_i, D * (1 + n_deepstack)]` (Qwen3-VL: merged | deepstack...)."""
        out = []
        for feats in self.image_features(model, images, prefixes):
            parts = [feats.embeds] + ([] if feats.deepstack is None else list(feats.deepstack))
            out.append(torch.cat(parts, dim=-1))
        return out

    def prefill(
        self, model: Any, rows: Sequence[RowInput], all_logits: bool = False
    ) -> tuple[Tensor, DecodeState]:
        from m2pt.families.qwen_vl_text import prefill

        return prefill(model, rows, all_logits=all_logits)

    def decode_step(self, model: Any, state: DecodeState, tokens: Tensor) -> Tensor:
        from m2pt.families.qwen_vl_text import decode_step

        return decode_step(model, state, tokens)

    def prefill_chunk(
        self, model: Any, row: RowInput, start: int, end: int, state: DecodeState | None = None
    ) -> tuple[Tensor, DecodeState]:
        """Chunked prefill of one row (the engine's `ModelOps.prefill_chunk`); any chunking == `prefill`."""
        from m2pt.families.qwen_vl_chunk import prefill_chunk

        return prefill_chunk(model, row, start, end, state)

    def load_processor(self, name_or_path: str) -> Any:
        from m2pt.families.qwen_vl_processor import load_processor

        return load_processor(name_or_path, self.model_type)


QWEN2_5_VL = QwenVLFamily("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl")
QWEN3_VL = QwenVLFamily("qwen3_vl", "Qwen3VLForConditionalGeneration", "qwen3_vl")
