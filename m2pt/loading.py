"""Load a Hugging Face LLaVA checkpoint frozen, on a chosen device and dtype, and describe it as a `ModelSpec`.

Loading is the only place that touches the hub or disk; nothing here runs at import time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from m2pt import hf
from m2pt.attention import install_prefix_attention
from m2pt.spec import ModelSpec

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnsupportedModelError(ValueError):
    """The checkpoint is not a LLaVA model with a CLIP-style vision tower and a Llama-family LLM."""


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU. An explicit `cuda` without a GPU raises with a clear message."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device} asked for, but torch sees no CUDA device; use --device cpu or auto"
        )
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA (float16 where bf16 is unsupported) and float32 on CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class FrozenLlava:
    """A loaded base: the HF model (eval mode, no grads), its processor, and its spec."""

    model: nn.Module  # LlavaForConditionalGeneration
    processor: Any  # LlavaProcessor
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype


def freeze(model: nn.Module) -> nn.Module:
    """Put `model` in eval mode with every parameter frozen; returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def spec_from_model(model: nn.Module, model_id: str) -> ModelSpec:
    """Read a `ModelSpec` off a LlavaForConditionalGeneration; raise `UnsupportedModelError` for other shapes."""
    cfg = hf.config(model)
    vcfg, tcfg = cfg.vision_config, cfg.text_config
    if not hf.has_part(model, "model.vision_tower.encoder.layers") or not hf.has_part(
        model, "model.language_model.layers"
    ):
        raise UnsupportedModelError(
            f"{model_id}: expected a LLaVA model with vision_tower.encoder.layers (CLIP-style) and a decoder LLM"
        )
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    patches = (vcfg.image_size // vcfg.patch_size) ** 2
    num_image_tokens = patches + (0 if cfg.vision_feature_select_strategy == "default" else 1)
    proj = hf.part(model, "model.multi_modal_projector").state_dict()
    return ModelSpec(
        model_id=model_id,
        vit_layers=vcfg.num_hidden_layers,
        vit_dim=vcfg.hidden_size,
        vit_heads=vcfg.num_attention_heads,
        llm_layers=tcfg.num_hidden_layers,
        llm_dim=tcfg.hidden_size,
        llm_heads=tcfg.num_attention_heads,
        llm_kv_heads=getattr(tcfg, "num_key_value_heads", None) or tcfg.num_attention_heads,
        llm_head_dim=head_dim,
        vocab_size=tcfg.vocab_size,
        image_token_id=cfg.image_token_id,
        image_size=vcfg.image_size,
        patch_size=vcfg.patch_size,
        num_image_tokens=num_image_tokens,
        projector_shapes={k: tuple(v.shape) for k, v in proj.items()},
    )


def load_frozen_llava(name_or_path: str, device: str = "auto", dtype: str = "auto") -> FrozenLlava:
    """Load model + processor from a local directory or hub id, frozen, on `device` in `dtype`.

    The vision tower is switched to the prefix-aware attention (identical to SDPA when no prefix is given).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from m2pt.preflight import check_model_source, check_transformers_version

    check_transformers_version()
    check_model_source(name_or_path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    log.info("loading %s on %s as %s", name_or_path, dev, dt)
    loaded = LlavaForConditionalGeneration.from_pretrained(name_or_path, dtype=dt, attn_implementation="sdpa")
    model = freeze(loaded).to(dev)  # nn.Module.to: transformers' decorated `.to` does not type-check
    processor = AutoProcessor.from_pretrained(name_or_path)
    install_prefix_attention(model)
    return FrozenLlava(model, processor, spec_from_model(model, str(name_or_path)), dev, dt)
