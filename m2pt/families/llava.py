"""Plain LLaVA (`LlavaForConditionalGeneration`): a CLIP or SigLIP ViT, an MLP projector, a Llama-family LLM.

The prompt math is `m2pt.prefix` (prompts -> per-layer K/V) and `m2pt.forward` (the batched forward); this
adapter wires them to the `ModelFamily` interface and states what it accepts:
- towers: CLIP (`clip_vision_model`: CLS token + `pre_layrnorm`) and SigLIP (`siglip_vision_model`: no CLS, no
  pre-norm; `post_layernorm`/`head` act on the last layer's output only, which LLaVA never reads);
- LLMs: the decoder types the equivalence suite ran on (`SUPPORTED_TEXT_MODELS`);
- `vision_feature_layer` an int or a list, `vision_feature_select_strategy` `default` (drop the first token,
  as HF does whatever the tower) or `full`.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from m2pt import hf
from m2pt.families.base import ImageInput, ModelFamily, UnsupportedModelError
from m2pt.spec import ModelSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from m2pt.forward import DecodeState, RowInput
    from m2pt.prefix import BundlePrefix
    from m2pt.prompts import PromptTensors

# tower model_type -> (HF class name, whether its embeddings prepend a CLS token)
SUPPORTED_TOWERS: dict[str, tuple[str, bool]] = {
    "clip_vision_model": ("CLIPVisionModel", True),
    "siglip_vision_model": ("SiglipVisionModel", False),
}
SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2", "qwen3")
STRATEGIES = ("default", "full")


def _require(ok: bool, model_id: str, what: str) -> None:
    if not ok:
        raise UnsupportedModelError(f"{model_id}: {what}")


def check_llava_config(config: Any, model_id: str) -> None:
    """The config-level checks of plain LLaVA (tower, LLM, feature layer, strategy)."""
    vcfg, tcfg = config.vision_config, config.text_config
    tower = getattr(vcfg, "model_type", None)
    _require(
        tower in SUPPORTED_TOWERS,
        model_id,
        f"vision tower {tower!r} is not supported; supported towers: {', '.join(SUPPORTED_TOWERS)}",
    )
    text = getattr(tcfg, "model_type", None)
    _require(
        text in SUPPORTED_TEXT_MODELS,
        model_id,
        f"language model {text!r} is not supported; supported: {', '.join(SUPPORTED_TEXT_MODELS)}",
    )
    strategy = config.vision_feature_select_strategy
    _require(
        strategy in STRATEGIES, model_id, f"vision_feature_select_strategy {strategy!r} is not supported"
    )
    layers = vcfg.num_hidden_layers
    chosen = config.vision_feature_layer
    chosen = [chosen] if isinstance(chosen, int) else list(chosen)
    _require(
        bool(chosen) and all(-(layers + 1) <= i <= layers for i in chosen),
        model_id,
        f"vision_feature_layer {config.vision_feature_layer!r} is outside the tower's {layers} layers",
    )


def _check_attention(attn: nn.Module, heads: int, model_id: str, where: str) -> None:
    head_dim = hf.int_attr(attn, "head_dim")
    for name in ("k_proj", "v_proj"):
        _require(hf.has_part(attn, name), model_id, f"{where}.self_attn has no {name}")
        proj = hf.part(attn, name)
        _require(isinstance(proj, nn.Linear), model_id, f"{where}.self_attn.{name} is not a linear layer")
        out_features = int(getattr(proj, "out_features", -1))
        _require(
            out_features == heads * head_dim,
            model_id,
            f"{where}.self_attn.{name} gives {out_features} features, expected {heads} heads x {head_dim}",
        )


def _check_tower(model: nn.Module, model_id: str) -> None:
    cfg = hf.config(model)
    tower = hf.part(model, "model.vision_tower")
    want_class = SUPPORTED_TOWERS[cfg.vision_config.model_type][0]
    _require(type(tower).__name__ == want_class, model_id, f"vision tower is {type(tower).__name__}")
    _require(hf.has_part(tower, "encoder.layers"), model_id, "the vision tower has no encoder.layers")
    layers = hf.layers(tower, "encoder.layers")
    _require(len(layers) == int(cfg.vision_config.num_hidden_layers), model_id, "ViT layer count != config")
    for i, layer in enumerate(layers):
        _require(hf.has_part(layer, "layer_norm1"), model_id, f"ViT layer {i} has no layer_norm1")
        attn = hf.part(layer, "self_attn")
        _check_attention(attn, int(cfg.vision_config.num_attention_heads), model_id, f"ViT layer {i}")


def _check_llm(model: nn.Module, model_id: str) -> None:
    tcfg = hf.config(model).text_config
    _require(
        hf.has_part(model, "model.language_model.rotary_emb")
        and hf.has_part(model, "model.language_model.layers"),
        model_id,
        "the LLM has no rotary_emb/layers",
    )
    kv_heads = int(getattr(tcfg, "num_key_value_heads", None) or tcfg.num_attention_heads)
    for i, layer in enumerate(hf.layers(model, "model.language_model.layers")):
        _require(hf.has_part(layer, "input_layernorm"), model_id, f"LLM layer {i} has no input_layernorm")
        attn = hf.part(layer, "self_attn")
        _check_attention(attn, kv_heads, model_id, f"LLM layer {i}")
        rotary = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        _require(callable(rotary), model_id, f"LLM layer {i}'s attention module has no apply_rotary_pos_emb")


def check_llava_modules(model: nn.Module, model_id: str) -> None:
    """The modules `m2pt.prefix` and `m2pt.forward` read, with the shapes they assume."""
    _check_tower(model, model_id)
    _check_llm(model, model_id)
    _require(hf.has_part(model, "model.multi_modal_projector"), model_id, "no multi_modal_projector")


def llava_spec(model: nn.Module, model_id: str) -> ModelSpec:
    """`ModelSpec` of a plain LLaVA. `vit_layers` counts the ViT layers that run (and carry visual prompts):
    up to the deepest `vision_feature_layer`. Image tokens: patches, + CLS for CLIP, - 1 for strategy
    `default`."""
    from m2pt.forward import vision_layers_used

    cfg = hf.config(model)
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    heads = int(tcfg.num_attention_heads)
    head_dim = int(getattr(tcfg, "head_dim", None) or int(tcfg.hidden_size) // heads)
    has_cls = SUPPORTED_TOWERS.get(vcfg.model_type, ("", True))[1]
    image_size, patch_size = int(vcfg.image_size), int(vcfg.patch_size)
    patches = (image_size // patch_size) ** 2
    num_image_tokens = patches + int(has_cls) - int(cfg.vision_feature_select_strategy == "default")
    proj = hf.part(model, "model.multi_modal_projector").state_dict()
    return ModelSpec(
        model_id=model_id,
        vit_layers=vision_layers_used(cfg),
        vit_dim=int(vcfg.hidden_size),
        vit_heads=int(vcfg.num_attention_heads),
        llm_layers=int(tcfg.num_hidden_layers),
        llm_dim=int(tcfg.hidden_size),
        llm_heads=heads,
        llm_kv_heads=int(getattr(tcfg, "num_key_value_heads", None) or heads),
        llm_head_dim=head_dim,
        vocab_size=int(tcfg.vocab_size),
        image_token_id=int(cfg.image_token_id),
        image_size=image_size,
        patch_size=patch_size,
        num_image_tokens=num_image_tokens,
        projector_shapes={k: tuple(v.shape) for k, v in proj.items()},
    )


class LlavaFamily(ModelFamily):
    """`LlavaForConditionalGeneration` with a CLIP or SigLIP tower."""

    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)

    def model_class(self) -> type[PreTrainedModel]:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def check_config(self, config: Any, model_id: str) -> None:
        check_llava_config(config, model_id)

    def check_modules(self, model: nn.Module, model_id: str) -> None:
        check_llava_modules(model, model_id)

    def prepare(self, model: nn.Module) -> None:
        from m2pt.attention import install_prefix_attention
        from m2pt.packed import install_packed_attention

        install_prefix_attention(model)
        install_packed_attention(model)  # one LLM forward per engine step (decode rows + prompt chunks)

    def spec_from_model(self, model: nn.Module, model_id: str) -> ModelSpec:
        return llava_spec(model, model_id)

    def projector(self, model: nn.Module) -> nn.Module:
        return hf.part(model, "model.multi_modal_projector")

    def compute_prefix(self, model: nn.Module, prompts: PromptTensors) -> BundlePrefix:
        from m2pt.prefix import compute_prefix

        return compute_prefix(model, prompts)

    def split_images(self, encoded: Mapping[str, Any]) -> list[ImageInput]:
        return [ImageInput(px) for px in encoded["pixel_values"]]  # each [3, H, W]

    def encode_images(
        self, model: nn.Module, images: Sequence[ImageInput], prefixes: Sequence[BundlePrefix | None]
    ) -> list[Tensor]:
        import torch

        from m2pt.forward import encode_images

        if not images:
            return []
        device = next(model.parameters()).device
        pixels = torch.stack([im.pixel_values for im in images]).to(device)  # [M, 3, H, W]
        return list(encode_images(model, pixels, prefixes))  # M x [N, D]

    def prefill(
        self, model: nn.Module, rows: Sequence[RowInput], all_logits: bool = False
    ) -> tuple[Tensor, DecodeState]:
        from m2pt.forward import prefill

        return prefill(model, rows, all_logits=all_logits)

    def decode_step(self, model: nn.Module, state: DecodeState, tokens: Tensor) -> Tensor:
        from m2pt.forward import decode_step

        return decode_step(model, state, tokens)


LLAVA = LlavaFamily()
