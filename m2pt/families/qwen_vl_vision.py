"""Deep visual prompts in the Qwen2.5-VL / Qwen3-VL vision tower, as a per-block K/V prefix of every attention chunk.

Where the prompts sit (the decision, documented in docs/qwen_vl.md):
- The tower packs all images of a batch into one sequence `[sum patches, D]` and attends within chunks given by
  `cu_seqlens`: one chunk per image in full-attention blocks, one chunk per window in Qwen2.5-VL's windowed blocks.
- Under M²PT's overwrite semantics (VPT-deep) the `Lv` prompt rows of block l are `P_v[l]`, placed in front of the
  image; we place a copy of them in front of EVERY chunk of that image (every window of a windowed block, the whole
  image of a full block). Their outputs are overwritten at the next block, so only their keys and values matter:
  `K_l, V_l = split(qkv(norm1(P_v[l])))[1:]`, the same for every chunk, computed once per bundle.
- They get NO rotary embedding, exactly like the LLaVA ViT prefix gets no position embedding. (No RoPE is the same
  as RoPE at grid position (0, 0): cos = 1, sin = 0.) Qwen3-VL's learned position embedding is added to patches
  only, not to prompts.
- Deepstack (Qwen3-VL): the taps after blocks in `deepstack_visual_indexes` read image rows only, so prompts act on
  deepstack features through attention, as on the final features.
- Each image carries its own bundle's prefix (the caller gives one prefix per image), so a batch mixes bundles.
The projector is `visual.merger` (+ `visual.deepstack_merger_list` in Qwen3-VL); a bundle's projector replaces them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from m2pt.prefix import BundlePrefix

MERGER = "merger."
DEEPSTACK = "deepstack_merger_list."


@dataclass
class ImageFeatures:
    """One image's inputs to the LLM: merged features, its grid and (Qwen3-VL) deepstack features."""

    embeds: Tensor  # [N, D], N = t*h*w / merge**2
    grid_thw: Tensor  # [3] long, in patches
    deepstack: Tensor | None = None  # [n_deepstack, N, D] (Qwen3-VL), None for Qwen2.5-VL


def visual_block_kv(model: Any, block_idx: int, prompt: Tensor) -> tuple[Tensor, Tensor]:
    """K/V of `prompt` [Lv, Dv] at vision block `block_idx`, each [H, Lv, hd]; no RoPE."""
    block = model.model.visual.blocks[block_idx]
    attn = block.attn
    qkv = attn.qkv(block.norm1(prompt)).reshape(prompt.shape[0], 3, attn.num_heads, -1)  # [Lv, 3, H, hd]
    return qkv[:, 1].transpose(0, 1), qkv[:, 2].transpose(0, 1)


def _chunk_owner(cu_seqlens: Tensor, image_starts: list[int]) -> list[tuple[int, int, int]]:
    """(start, end, image index) per chunk; chunks never straddle images."""
    bounds = cu_seqlens.tolist()
    out = []
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        owner = max(i for i, s in enumerate(image_starts) if s <= start)
        out.append((int(start), int(end), owner))
    return out


def _chunk_attention(
    q: Tensor,  # [S, H, hd], RoPE applied
    k: Tensor,
    v: Tensor,
    chunks: list[tuple[int, int, int]],
    prefix_kv: Sequence[tuple[Tensor, Tensor] | None],  # per image: (K, V) [H, Lv, hd] of this block
    prefix_keys: Sequence[int],  # per image: equal keys <=> the same prefix (batched together)
    scale: float,
) -> Tensor:
    """Attention within each chunk over `[its image's prefix | chunk]`.

    Chunks of equal length and equal prefix run as one batched SDPA call."""
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for chunk in chunks:
        groups.setdefault((chunk[1] - chunk[0], prefix_keys[chunk[2]]), []).append(chunk)
    out = q.new_empty(q.shape)
    for chunk_group in groups.values():
        n, length = len(chunk_group), chunk_group[0][1] - chunk_group[0][0]
        if n == 1:  # one chunk (a whole image): slices, no gather
            (start, end, _), idx = chunk_group[0], None
            qc, kc, vc = (t[start:end][None].transpose(1, 2) for t in (q, k, v))
        else:
            idx = torch.cat([torch.arange(s, e, device=q.device) for s, e, _ in chunk_group])
            qc, kc, vc = (
                t.index_select(0, idx).view(n, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)
            )
        part = prefix_kv[chunk_group[0][2]]
        if part is not None:  # [n, H, Lv + length, hd]
            kc = torch.cat([part[0].to(kc.dtype).expand(n, -1, -1, -1), kc], dim=2)
            vc = torch.cat([part[1].to(vc.dtype).expand(n, -1, -1, -1), vc], dim=2)
        res = nn.functional.scaled_dot_product_attention(qc, kc, vc, scale=scale)  # [n, H, length, hd]
        rows = res.transpose(1, 2).reshape(n * length, *q.shape[1:])  # [n * length, H, hd]
        if idx is None:
            out[start:end] = rows
        else:
            out.index_copy_(0, idx, rows)
    return out


def block_forward(
    block: Any,
    hidden: Tensor,  # [S, Dv]
    position_embeddings: tuple[Tensor, Tensor],  # cos, sin [S, hd]
    chunks: list[tuple[int, int, int]],
    prefix_kv: Sequence[tuple[Tensor, Tensor] | None],
    prefix_keys: Sequence[int],
) -> Tensor:
    """One vision block (pre-norm attention + MLP) with per-image K/V prefixes; the block's own weights."""
    attn = block.attn
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
    seq = hidden.shape[0]
    q, k, v = attn.qkv(block.norm1(hidden)).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = rotary(q, k, *position_embeddings)  # [S, H, hd]
    attended = _chunk_attention(q, k, v, chunks, prefix_kv, prefix_keys, attn.scaling).reshape(seq, -1)
    hidden = hidden + attn.proj(attended)
    return hidden + block.mlp(block.norm2(hidden))


def block_prefixes(
    prefixes: Sequence[BundlePrefix | None], block_idx: int
) -> list[tuple[Tensor, Tensor] | None]:
    """Per image: this block's visual (K, V), or None for an image without visual prompts."""
    out: list[tuple[Tensor, Tensor] | None] = []
    for p in prefixes:
        if p is None or p.visual_k is None or p.visual_v is None:
            out.append(None)
        else:
            out.append((p.visual_k[block_idx], p.visual_v[block_idx]))
    return out


def prefix_keys(prefixes: Sequence[BundlePrefix | None]) -> list[int]:
    """Per image: a key equal for images that share a bundle prefix object (-1: no visual prompts)."""
    return [-1 if p is None or p.visual_k is None else id(p) for p in prefixes]


def apply_projector(module: nn.Module, weights: dict[str, Tensor] | None, prefix: str, x: Tensor) -> Tensor:
    """`module(x)`, or with a bundle's weights (keys relative to `model.model.visual`, e.g. `merger.ln_q.weight`)."""
    if weights is None:
        return module(x)
    own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    return functional_call(module, own, (x,))


def projector_state(model: Any) -> dict[str, Tensor]:
    """The base projector's weights, keyed as bundles store them (relative to `model.model.visual`)."""
    visual = model.model.visual
    state = {MERGER + k: v for k, v in visual.merger.state_dict().items()}
    for i, merger in enumerate(getattr(visual, "deepstack_merger_list", [])):
        state.update({f"{DEEPSTACK}{i}.{k}": v for k, v in merger.state_dict().items()})
    return state
