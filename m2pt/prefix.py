"""Turn a task's prompts into the per-layer key/value prefixes the frozen model attends to.

The equivalence (design §2): a deep prompt row is overwritten at every layer's input, so the only thing the real
tokens ever see of it are its keys and values at each layer, and those depend on the prompt parameters alone.
- LLM layer l:  K = RoPE(k_proj(input_layernorm(P_t[l])), positions 0..Lt-1),  V = v_proj(input_layernorm(P_t[l]))
- ViT layer l:  K = k_proj(layer_norm1(P_v[l])),  V = v_proj(layer_norm1(P_v[l]))   (no position embedding)
`compute_prefix` is differentiable: training calls it with trainable prompts every step; serving calls it once per
bundle under `torch.inference_mode()` and keeps the result on the device.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from m2pt import hf
from m2pt.prompts import PromptTensors


@dataclass
class BundlePrefix:
    """A task's prompts in the form the forward consumes. Tensors live on the model's device and dtype."""

    text_k: Tensor | None  # [llm_layers, Hkv, Lt, hd], RoPE applied at positions 0..Lt-1
    text_v: Tensor | None  # [llm_layers, Hkv, Lt, hd]
    visual_k: Tensor | None  # [vit_layers, H, Lv, hd]
    visual_v: Tensor | None  # [vit_layers, H, Lv, hd]
    projector: dict[str, Tensor] | None  # replaces the base projector's weights for this task

    def text_kv(self) -> tuple[Tensor, Tensor] | None:
        """(K, V) of the text prefix, or None when the bundle has no text prompts."""
        return None if self.text_k is None or self.text_v is None else (self.text_k, self.text_v)

    def visual_kv(self) -> tuple[Tensor, Tensor] | None:
        """(K, V) of the visual prefix, or None when the bundle has no visual prompts."""
        return None if self.visual_k is None or self.visual_v is None else (self.visual_k, self.visual_v)

    @property
    def text_len(self) -> int:
        return 0 if self.text_k is None else int(self.text_k.shape[2])

    @property
    def visual_len(self) -> int:
        return 0 if self.visual_k is None else int(self.visual_k.shape[2])

    def nbytes(self) -> int:
        tensors = [self.text_k, self.text_v, self.visual_k, self.visual_v, *(self.projector or {}).values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _split_heads(x: Tensor, head_dim: int) -> Tensor:
    """[1, L, H*hd] -> [1, H, L, hd]"""
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def _rope_kind(lm: nn.Module, layer_idx: int) -> dict[str, str]:
    """`{"layer_type": ...}` for LLMs whose rotary embedding differs per layer type (Gemma 3: local layers use
    their own base frequency), else `{}`."""
    layer_types = getattr(hf.config(lm), "layer_types", None)
    rotary = hf.part(lm, "rotary_emb")
    if layer_types is None or "layer_type" not in inspect.signature(rotary.forward).parameters:
        return {}
    return {"layer_type": str(layer_types[layer_idx])}


def text_layer_kv(model: nn.Module, layer_idx: int, prompt: Tensor) -> tuple[Tensor, Tensor]:
    """K/V of `prompt` [Lt, D] at LLM layer `layer_idx`, each [Hkv, Lt, hd], RoPE at positions 0..Lt-1."""
    lm = hf.part(model, "model.language_model")
    layer = hf.layers(lm, "layers")[layer_idx]
    attn = hf.part(layer, "self_attn")
    head_dim = hf.int_attr(attn, "head_dim")
    x = hf.part(layer, "input_layernorm")(prompt[None])  # [1, Lt, D]
    k = hf.part(attn, "k_proj")(x).view(1, x.shape[1], -1, head_dim)  # [1, Lt, Hkv, hd]
    if hf.has_part(attn, "k_norm"):  # Qwen3-style per-head key norm
        k = hf.part(attn, "k_norm")(k)
    k = k.transpose(1, 2)  # [1, Hkv, Lt, hd]
    v = _split_heads(hf.part(attn, "v_proj")(x), head_dim)
    positions = torch.arange(prompt.shape[0], device=prompt.device)[None]  # [1, Lt]
    cos, sin = hf.part(lm, "rotary_emb")(x, positions, **_rope_kind(lm, layer_idx))
    apply_rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    _, k = apply_rotary(k, k, cos, sin)
    return k[0], v[0]


def visual_layer_kv(model: nn.Module, layer_idx: int, prompt: Tensor) -> tuple[Tensor, Tensor]:
    """K/V of `prompt` [Lv, Dv] at ViT layer `layer_idx`, each [H, Lv, hd]."""
    layer = hf.layers(model, "model.vision_tower.encoder.layers")[layer_idx]
    attn = hf.part(layer, "self_attn")
    head_dim = hf.int_attr(attn, "head_dim")
    x = hf.part(layer, "layer_norm1")(prompt[None])  # [1, Lv, Dv]
    k = _split_heads(hf.part(attn, "k_proj")(x), head_dim)  # [1, H, Lv, hd]
    v = _split_heads(hf.part(attn, "v_proj")(x), head_dim)
    return k[0], v[0]


def compute_prefix(model: nn.Module, prompts: PromptTensors) -> BundlePrefix:
    """Per-layer K/V prefixes (and the cast projector) for `prompts` on the model's device and dtype.

    Differentiable w.r.t. the prompt tensors; wrap in `torch.inference_mode()` to precompute for serving.
    """
    ref = next(model.parameters())
    device, dtype = ref.device, ref.dtype
    text_k = text_v = visual_k = visual_v = None
    if prompts.text is not None:
        pairs = [text_layer_kv(model, i, p.to(device, dtype)) for i, p in enumerate(prompts.text)]
        text_k, text_v = torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])
    if prompts.visual is not None:
        pairs = [visual_layer_kv(model, i, p.to(device, dtype)) for i, p in enumerate(prompts.visual)]
        visual_k, visual_v = torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])
    projector = None
    if prompts.projector is not None:
        projector = {k: v.to(device, dtype) for k, v in prompts.projector.items()}
    return BundlePrefix(text_k, text_v, visual_k, visual_v, projector)
