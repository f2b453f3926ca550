"""Prefix-aware attention for the vision tower: the ViT half of the deep-prompt ↔ KV-prefix equivalence.

A deep visual prompt is overwritten at every ViT layer's input, so the image tokens only ever see its keys and
values. Each attention module's prefix `(keys, values, key_bias)` is bound for the duration of a tower forward by
`visual_prefixes({id(attn_module): prefix})` (a context variable, so concurrent threads do not see each other's
prefixes; it works for towers whose attention does not forward `**kwargs`, e.g. SigLIP). A prefix may also be
passed as `m2pt_prefix=` through kwargs. This function prepends it to the layer's own keys and values and runs
SDPA. Without a prefix it is plain SDPA.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn

ATTN_NAME = "m2pt_prefix_sdpa"

Prefix = tuple[Tensor, Tensor, Tensor]  # keys [B,H,P,hd], values [B,H,P,hd], additive bias [B,P]
_BOUND: ContextVar[Mapping[int, Prefix] | None] = ContextVar("m2pt_visual_prefixes", default=None)


@contextmanager
def visual_prefixes(by_module: Mapping[int, Prefix]) -> Iterator[None]:
    """Bind each attention module's prefix (keyed by `id(module)`) while the block runs."""
    token = _BOUND.set(by_module)
    try:
        yield
    finally:
        _BOUND.reset(token)


def prefix_sdpa_attention(
    module: nn.Module,
    query: Tensor,  # [B, H, Tq, hd]
    key: Tensor,  # [B, H, Tk, hd]
    value: Tensor,  # [B, H, Tk, hd]
    attention_mask: Tensor | None,  # additive [B, 1, Tq, Tk] or None
    m2pt_prefix: Prefix | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """SDPA over `[prefix keys | own keys]`. `m2pt_prefix` = (keys [B,H,P,hd], values [B,H,P,hd], bias [B,P]),
    where bias is 0 for a real prefix row and -inf for padding (rows with a shorter prefix or none)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if m2pt_prefix is None:
        bound = _BOUND.get()
        m2pt_prefix = None if bound is None else bound.get(id(module))
    if m2pt_prefix is not None:
        prefix_k, prefix_v, prefix_bias = m2pt_prefix
        batch, _, q_len, _ = query.shape
        key = torch.cat([prefix_k.to(key.dtype), key], dim=2)  # [B, H, P+Tk, hd]
        value = torch.cat([prefix_v.to(value.dtype), value], dim=2)
        bias = prefix_bias.to(query.dtype)[:, None, None, :].expand(batch, 1, q_len, -1)  # [B, 1, Tq, P]
        own = (
            attention_mask
            if attention_mask is not None
            else bias.new_zeros(batch, 1, q_len, key.shape[2] - bias.shape[-1])
        )
        attention_mask = torch.cat([bias, own.to(bias.dtype)], dim=-1)  # [B, 1, Tq, P+Tk]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def install_prefix_attention(model: nn.Module) -> None:
    """Register the prefix attention with transformers and switch `model`'s vision tower to it (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, prefix_sdpa_attention)
    vision_tower = model.model.vision_tower
    vision_tower.config._attn_implementation = ATTN_NAME
    for module in vision_tower.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and cfg is not vision_tower.config:
            cfg._attn_implementation = ATTN_NAME
