"""`encode_images` for Qwen2.5-VL and Qwen3-VL: the vision tower under per-image visual prefixes, then the merger(s).

Inputs are what the family's image processor emits for a list of images: `pixel_values` [sum patches, C*T*p*p]
(flattened patches, images concatenated) and `image_grid_thw` [n_images, 3]. `prefixes` has one entry per image
(its row's bundle, or None). With every prefix None this computes exactly what `model.model.get_image_features`
computes (tests/test_qwen_vl_equivalence.py pins it). Preprocessing (window order, RoPE tables, position
interpolation) is transformers' own (`transformers.vision_utils`), so it tracks the installed version.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from m2pt.families.qwen_vl_vision import (
    DEEPSTACK,
    MERGER,
    ImageFeatures,
    _chunk_owner,
    apply_projector,
    block_forward,
    block_prefixes,
    prefix_keys,
)
from m2pt.prefix import BundlePrefix


def _image_starts(grid_thw: Tensor) -> list[int]:
    sizes = grid_thw.prod(-1).tolist()
    return [int(sum(sizes[:i])) for i in range(len(sizes))]


def _check(pixel_values: Tensor, grid_thw: Tensor, prefixes: Sequence[BundlePrefix | None]) -> None:
    if len(prefixes) != grid_thw.shape[0]:
        raise ValueError(f"{grid_thw.shape[0]} images but {len(prefixes)} prefixes (one per image)")
    if int(grid_thw.prod(-1).sum()) != pixel_values.shape[0]:
        raise ValueError(
            f"image_grid_thw covers {int(grid_thw.prod(-1).sum())} patches, got {pixel_values.shape[0]}"
        )


def _merge(
    model: Any,
    hidden: Tensor,
    grid_thw: Tensor,
    prefixes: Sequence[BundlePrefix | None],
    module_name: str,
) -> list[Tensor]:
    """Apply a merger (`merger` or `deepstack_merger_list.i`) per image with its bundle's weights: [N_i, D] each."""
    visual = model.model.visual
    module = visual.get_submodule(module_name.rstrip("."))
    starts, sizes = _image_starts(grid_thw), grid_thw.prod(-1).tolist()
    return [
        apply_projector(module, None if p is None else p.projector, module_name, hidden[s : s + n])
        for s, n, p in zip(starts, sizes, prefixes, strict=True)
    ]


def encode_images_qwen2_5(
    model: Any, pixel_values: Tensor, grid_thw: Tensor, prefixes: Sequence[BundlePrefix | None]
) -> list[ImageFeatures]:
    """Qwen2.5-VL: windowed blocks (prefix per window) and full blocks (prefix per image), then the merger."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    _check(pixel_values, grid_thw, prefixes)
    visual = model.model.visual
    merge = visual.spatial_merge_size
    window_index, cu_window = get_vision_window_index(grid_thw, merge, visual.window_size, visual.patch_size)
    cu_full = get_vision_cu_seqlens(grid_thw)  # one chunk per image (per frame)
    hidden = visual.patch_embed(pixel_values.to(visual.dtype))  # [S, Dv]
    seq = hidden.shape[0]
    hidden = visual.permute_input_for_window_attn(hidden, window_index, seq_len=seq)
    cos, sin = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid_thw, merge))
    rope = tuple(visual.permute_input_for_window_attn(t, window_index, seq_len=seq) for t in (cos, sin))
    starts = _image_starts(grid_thw)  # windows permute within an image, so image ranges are unchanged
    full_chunks, window_chunks = _chunk_owner(cu_full, starts), _chunk_owner(cu_window, starts)
    keys = prefix_keys(prefixes)
    for idx, block in enumerate(visual.blocks):
        chunks = full_chunks if idx in visual.fullatt_block_indexes else window_chunks
        hidden = block_forward(block, hidden, rope, chunks, block_prefixes(prefixes, idx), keys)
    merged = torch.cat(_merge(model, hidden, grid_thw, prefixes, MERGER))[torch.argsort(window_index)]
    sizes = (grid_thw.prod(-1) // merge**2).tolist()
    return [ImageFeatures(e, g) for e, g in zip(torch.split(merged, sizes), grid_thw, strict=True)]


def encode_images_qwen3(
    model: Any, pixel_values: Tensor, grid_thw: Tensor, prefixes: Sequence[BundlePrefix | None]
) -> list[ImageFeatures]:
    """Qwen3-VL: learned + RoPE positions, full attention per image, deepstack taps, then the mergers."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    _check(pixel_values, grid_thw, prefixes)
    visual = model.model.visual
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid_thw,
        num_grid_per_side=visual.num_grid_per_side,
        mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners,
        spatial_merge_size=visual.config.spatial_merge_size,
    )
    hidden = visual.patch_embed(pixel_values.to(visual.dtype))  # [S, Dv]
    hidden = hidden + (visual.pos_embed(indices) * weights[:, :, None]).sum(1).to(hidden.dtype)
    rope = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid_thw, visual.spatial_merge_size))
    starts = _image_starts(grid_thw)
    chunks = _chunk_owner(get_vision_cu_seqlens(grid_thw), starts)
    keys = prefix_keys(prefixes)
    taps: list[list[Tensor]] = []
    for idx, block in enumerate(visual.blocks):
        hidden = block_forward(block, hidden, rope, chunks, block_prefixes(prefixes, idx), keys)
        if idx in visual.deepstack_visual_indexes:
            name = f"{DEEPSTACK}{visual.deepstack_visual_indexes.index(idx)}."
            taps.append(_merge(model, hidden, grid_thw, prefixes, name))
    merged = _merge(model, hidden, grid_thw, prefixes, MERGER)
    return [
        ImageFeatures(merged[i], grid_thw[i], torch.stack([tap[i] for tap in taps]) if taps else None)
        for i in range(len(merged))
    ]
