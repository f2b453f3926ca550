"""Deep textual prompts in the Qwen2.5-VL / Qwen3-VL LLM: a per-layer KV prefix under M-RoPE.

- The prefix is `m2pt.prefix.text_layer_kv` unchanged: K/V of `input_layernorm(P_t[l])`, RoPE at positions
  (i, i, i) for i in 0..Lt-1 (M-RoPE with three equal axes is plain RoPE at i), i.e. the prompts are `Lt` leading
  text tokens. Real tokens then sit exactly where they would after `Lt` leading text tokens: transformers'
  `get_rope_index` positions of the row (text 1-D, image tokens (t, h, w) on the merged grid) shifted by `Lt`.
- rope_deltas: not used (HF keeps them on the model, which is wrong for a batch mixing rows). Each row's next
  decode position is `max(3-D positions) + 1`, which is what HF's `rope_deltas` encodes (delta = max + 1 - T); it
  lives in `DecodeState.positions` ([B]) and decode tokens get it on all three axes, so `m2pt.forward`'s
  `DecodeState.select/merge` and `decode_step` work unchanged.
- Deepstack (Qwen3-VL): each image's feature tensor is `[N, D * (1 + n_deepstack)]`: the merged features, then the
  deepstack features of each tapped block, side by side (so one tensor per image can be cached and concatenated like
  any family's). Prefill splits them and adds the deepstack parts after the first LLM layers, as HF does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from m2pt.forward import DecodeState, RowInput, _prefix_cache


def row_positions(model: Any, row: RowInput, offset: int) -> Tensor:
    """3-D M-RoPE positions [3, T] of one row's tokens, shifted by its text prefix length `offset`."""
    ids = row.input_ids.to(model.lm_head.weight.device)
    image_token = model.config.image_token_id
    grids = [im.extras["image_grid_thw"] for im in row.images]
    if not grids:
        if bool((ids == image_token).any()):
            raise ValueError("the row has image placeholders but no images (RowInput.images)")
        return torch.arange(ids.shape[0], device=ids.device).expand(3, -1) + offset
    types = (ids == image_token).long()[None]  # [1, T]: 1 = image token
    grid = torch.stack([g.reshape(3) for g in grids]).to(ids.device)
    positions, _ = model.model.get_rope_index(ids[None], types, image_grid_thw=grid)  # [3, 1, T]
    return positions[:, 0] + offset


def split_features(features: Tensor, width: int) -> tuple[Tensor, list[Tensor]]:
    """[n, D * (1 + k)] -> merged [n, D] and k deepstack [n, D]."""
    parts = list(features.split(width, dim=-1))
    return parts[0], parts[1:]


def embed_rows(model: Any, rows: Sequence[RowInput]) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Left-padded embeds [B, T, D] with image features scattered, mask [B, T], image slots [B, T] and the
    deepstack features of every image token in batch order (empty list for Qwen2.5-VL)."""
    device = model.lm_head.weight.device
    length = max(int(r.input_ids.shape[0]) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        n = int(row.input_ids.shape[0])
        ids[b, length - n :] = row.input_ids.to(device)
        mask[b, length - n :] = 1
    embeds = model.model.get_input_embeddings()(ids)  # [B, T, D]
    slots = (ids == model.config.image_token_id) & mask.bool()
    features = [r.image_features for r in rows if r.image_features is not None]
    have = sum(int(f.shape[0]) for f in features)
    if int(slots.sum()) != have:
        raise ValueError(f"{int(slots.sum())} image placeholder tokens but {have} image feature rows")
    deepstack: list[Tensor] = []
    if have:
        merged, deepstack = split_features(torch.cat(features).to(embeds.dtype), embeds.shape[-1])
        embeds = embeds.masked_scatter(slots[..., None].expand_as(embeds), merged)
    return embeds, mask, slots, deepstack


def batch_positions(model: Any, rows: Sequence[RowInput], mask: Tensor, prefix_len: Tensor) -> Tensor:
    """Position ids [3, B, T] of the left-padded batch (padding columns get 0; they are masked)."""
    positions = mask.new_zeros(3, *mask.shape)
    for b, row in enumerate(rows):
        n = int(row.input_ids.shape[0])
        positions[:, b, mask.shape[1] - n :] = row_positions(model, row, int(prefix_len[b]))
    return positions


def deepstack_kwargs(slots: Tensor, deepstack: list[Tensor]) -> dict[str, Any]:
    if not deepstack:
        return {}
    return {"visual_pos_masks": slots, "deepstack_visual_embeds": deepstack}


def prefill(model: Any, rows: Sequence[RowInput], all_logits: bool = False) -> tuple[Tensor, DecodeState]:
    """Every row's prompt under its bundle's text prefix; logits [B, V] (or [B, T, V]) and the decode state."""
    embeds, text_mask, slots, deepstack = embed_rows(model, rows)
    cache, prefix_mask, prefix_len = _prefix_cache(model, rows, embeds, room=embeds.shape[1] + 64)
    positions = batch_positions(model, rows, text_mask, prefix_len)  # [3, B, T]
    attention_mask = torch.cat([prefix_mask, text_mask], dim=1)  # [B, P + T]
    out = model.model.language_model(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        **deepstack_kwargs(slots, deepstack),
    )
    hidden = out.last_hidden_state if all_logits else out.last_hidden_state[:, -1]
    next_position = positions.amax(dim=(0, 2)) + 1  # [B]; padding columns are 0, never the max
    return model.lm_head(hidden), DecodeState(cache, attention_mask, next_position)


def decode_step(model: Any, state: DecodeState, tokens: Tensor) -> Tensor:
    """One token per row ([B] long) at position `state.positions` on all three axes; logits [B, V]."""
    state.attention_mask = nn.functional.pad(state.attention_mask, (0, 1), value=1)
    embeds = model.model.get_input_embeddings()(tokens[:, None])  # [B, 1, D]
    positions = state.positions[None, :, None].expand(3, -1, 1)  # [3, B, 1]
    out = model.model.language_model(
        inputs_embeds=embeds,
        attention_mask=state.attention_mask,
        position_ids=positions,
        cache=state.cache,
        use_cache=True,
    )
    state.positions = state.positions + 1
    return model.lm_head(out.last_hidden_state[:, -1])
