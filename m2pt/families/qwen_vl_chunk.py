"""Chunked prefill of one Qwen-VL row (what the engine's token-budget scheduler feeds): prompt tokens [start, end)
appended to the row's cache, at the row's own M-RoPE positions, so any chunking equals `qwen_vl_text.prefill`.

The 3-D positions of a chunk are the slice [start, end) of the whole row's positions (they depend on every image's
grid, not on a running counter); deepstack features are added to the chunk's own image tokens. After the last chunk
`DecodeState.positions` is the row's `max(positions) + 1`, as after `prefill`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from m2pt.families.qwen_vl_text import deepstack_kwargs, row_positions, split_features
from m2pt.forward import DecodeState, RowInput, _prefix_cache


def chunk_features(row: RowInput, start: int, end: int, image_token_id: int) -> Tensor | None:
    """The rows of `row.image_features` filling the placeholders in `input_ids[start:end]` (None if none)."""
    slots = row.input_ids == image_token_id  # [T]
    have = 0 if row.image_features is None else int(row.image_features.shape[0])
    if int(slots.sum()) != have:
        raise ValueError(f"{int(slots.sum())} image placeholder tokens but {have} image feature rows")
    before, inside = int(slots[:start].sum()), int(slots[start:end].sum())
    if inside == 0 or row.image_features is None:
        return None
    return row.image_features[before : before + inside]


def prefill_chunk(
    model: Any, row: RowInput, start: int, end: int, state: DecodeState | None = None
) -> tuple[Tensor, DecodeState]:
    """Feed `input_ids[start:end]` of ONE row (state None = first chunk, which starts the cache with the bundle's
    text prefix). Returns the chunk's last-token logits [1, V] and the row's state. Inference only."""
    total = int(row.input_ids.shape[0])
    if (state is None) != (start == 0) or not 0 <= start < end <= total:
        raise ValueError(f"bad chunk [{start}, {end}) of a {total}-token prompt")
    device = model.lm_head.weight.device
    ids = row.input_ids[start:end].to(device)[None]  # [1, C]
    embeds = model.model.get_input_embeddings()(ids)  # [1, C, D]
    slots = ids == model.config.image_token_id  # [1, C]
    features = chunk_features(row, start, end, model.config.image_token_id)
    deepstack: list[Tensor] = []
    if features is not None:
        merged, deepstack = split_features(features.to(device, embeds.dtype), embeds.shape[-1])
        embeds = embeds.masked_scatter(slots[..., None].expand_as(embeds), merged)
    if state is None:
        cache, mask, _ = _prefix_cache(model, [row], embeds, room=total + 64)  # mask [1, P]
    else:
        cache, mask = state.cache, state.attention_mask
    prefix_len = 0 if row.prefix is None else row.prefix.text_len
    positions = row_positions(model, row, prefix_len)  # [3, T]
    attention_mask = torch.cat([mask, mask.new_ones(1, end - start)], dim=1)  # [1, S + C]
    out = model.model.language_model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=positions[:, None, start:end],  # [3, 1, C]
        cache=cache,
        use_cache=True,
        **deepstack_kwargs(slots, deepstack),
    )
    next_position = positions[:, :end].amax()[None] + 1  # [1]
    return model.lm_head(out.last_hidden_state[:, -1]), DecodeState(cache, attention_mask, next_position)
