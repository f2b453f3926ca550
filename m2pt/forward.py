"""The one forward of a frozen LLaVA under M²PT prompts, for a batch whose rows each use a different bundle or none.

Layout of a batch (verified exact against running each row alone, see tests/test_core_equivalence.py):
- ViT: row b attends to `[visual prefix_b (left-padded, masked) | CLS (CLIP only) | patches]` at every layer
  that runs (layers past the deepest `vision_feature_layer` are skipped).
- LLM cache: `[pad | text prefix_b]` per layer; attention mask `[prefix mask | text mask]`;
  position ids of real tokens start at `Lt_b` (the prefix occupies RoPE positions 0..Lt_b-1).
- Projector: rows whose bundle carries a projector use it; the others use the base projector.
A row with no bundle computes exactly what the unmodified HF model computes.

Training calls `encode_images` + `prefill(all_logits=True)` with trainable prompts; serving calls the same
functions under `torch.inference_mode()` and then `decode_step`. This module does no I/O and knows no requests.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call

from m2pt import hf
from m2pt.attention import visual_prefixes
from m2pt.cache import GrowableLayer, layer_states, set_layer_states, swap_remove_order
from m2pt.families.base import ImageInput
from m2pt.prefix import BundlePrefix

if TYPE_CHECKING:
    from transformers import DynamicCache

NEG_INF = float("-inf")


@dataclass
class RowInput:
    """One sequence: token ids with image placeholders already expanded, and the features that fill them."""

    input_ids: Tensor  # [T] long
    image_features: Tensor | None  # [n_image_tokens, D], one block per image in order; None if no image
    prefix: BundlePrefix | None
    images: Sequence[ImageInput] = ()  # the row's images (families whose positions depend on them read these)


def _stack_prefixes(
    parts: Sequence[tuple[Tensor, Tensor] | None], like: Tensor
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Left-pad per-row `(K, V)` of shape [layers, H, L_b, hd] to one batch tensor.

    Returns K, V as [layers, B, H, Lmax, hd] and the additive bias [B, Lmax] (0 real, -inf padding), or None when
    no row has a prefix.
    """
    present = [p for p in parts if p is not None]
    if not present:
        return None
    layers, heads, _, head_dim = present[0][0].shape
    max_len = max(p[0].shape[2] for p in present)
    batch = len(parts)
    keys = like.new_zeros(layers, batch, heads, max_len, head_dim)
    values = like.new_zeros(layers, batch, heads, max_len, head_dim)
    bias = like.new_full((batch, max_len), NEG_INF)
    for row, part in enumerate(parts):
        if part is None:
            continue
        length = part[0].shape[2]
        keys[:, row, :, max_len - length :] = part[0]
        values[:, row, :, max_len - length :] = part[1]
        bias[row, max_len - length :] = 0.0
    return keys, values, bias


def feature_layer_indices(config) -> list[int]:
    """`config.vision_feature_layer` as non-negative indices into the tower's hidden states (0 = embeddings,
    i = output of layer i-1), so that they stay valid when only the needed layers run."""
    layer = config.vision_feature_layer
    total = config.vision_config.num_hidden_layers + 1
    return [i if i >= 0 else total + i for i in ([layer] if isinstance(layer, int) else layer)]


def vision_layers_used(config) -> int:
    """How many ViT layers must run: up to the deepest one `vision_feature_layer` selects. Later layers'
    outputs are never read, so they are not run and a bundle carries no visual prompts for them."""
    return max(feature_layer_indices(config))


def select_image_features(model: nn.Module, hidden_states: Sequence[Tensor]) -> Tensor:
    """Pick the configured ViT layer(s) and apply the CLS strategy, as `LlavaModel.get_image_features` does.

    `hidden_states` is the embedding output and then each run layer's output (maybe fewer than all layers)."""
    cfg = hf.config(model)
    chosen = [hidden_states[i] for i in feature_layer_indices(cfg)]
    if cfg.vision_feature_select_strategy == "default":
        chosen = [h[:, 1:] for h in chosen]
    return torch.cat(chosen, dim=-1)  # [B, N, Dv']


def vision_hidden_states(
    model: nn.Module,
    pixel_values: Tensor,
    prefixes: Sequence[BundlePrefix | None],
    num_layers: int | None = None,
) -> list[Tensor]:
    """Run the ViT's needed layers (`vision_layers_used`) with each row's visual prefix; returns the embedding
    output and each run layer's output. CLIP applies `pre_layrnorm` to the embeddings; SigLIP has none (and
    its `post_layernorm`/`head` act on the last layer's output only, which LLaVA never reads). `num_layers`
    overrides how many layers run (families without `vision_feature_layer`, e.g. Gemma 3: all)."""
    tower = hf.part(model, "model.vision_tower")
    hidden = hf.part(tower, "embeddings")(pixel_values.to(hf.param_dtype(tower)))  # [B, (1+)N, Dv]
    if hf.has_part(tower, "pre_layrnorm"):
        hidden = hf.part(tower, "pre_layrnorm")(hidden)
    stacked = _stack_prefixes([None if p is None else p.visual_kv() for p in prefixes], hidden)
    states = [hidden]
    run = vision_layers_used(hf.config(model)) if num_layers is None else num_layers
    for idx, layer in enumerate(hf.layers(tower, "encoder.layers")[:run]):
        attn = hf.part(layer, "self_attn")
        bound = {} if stacked is None else {id(attn): (stacked[0][idx], stacked[1][idx], stacked[2])}
        with visual_prefixes(bound):
            hidden = layer(hidden, None)
        states.append(hidden)
    return states


def project_features(model: nn.Module, features: Tensor, prefixes: Sequence[BundlePrefix | None]) -> Tensor:
    """Apply each row's projector (its bundle's, or the base one). features [B, N, Dv] -> [B, N, D]."""
    projector = hf.part(model, "model.multi_modal_projector")
    groups: dict[int, list[int]] = {}
    weights: dict[int, dict[str, Tensor] | None] = {}
    for row, prefix in enumerate(prefixes):
        proj = None if prefix is None else prefix.projector
        groups.setdefault(id(proj), []).append(row)
        weights[id(proj)] = proj

    def run(key: int, inputs: Tensor) -> Tensor:
        tuned = weights[key]
        return projector(inputs) if tuned is None else functional_call(projector, tuned, (inputs,))

    if len(groups) == 1:
        (key,) = groups
        return run(key, features)
    out: Tensor | None = None
    for key, rows in groups.items():
        idx = torch.tensor(rows, device=features.device)
        sub = run(key, features.index_select(0, idx))
        if out is None:
            out = sub.new_empty(features.shape[0], *sub.shape[1:])
        out = out.index_copy(0, idx, sub)
    assert out is not None
    return out


def encode_images(model: nn.Module, pixel_values: Tensor, prefixes: Sequence[BundlePrefix | None]) -> Tensor:
    """Image features for the LLM, one image per row: pixel_values [B, 3, H, W] -> [B, N, D].

    Row b's features depend on its bundle (visual prompts and projector), so cache them per (image, bundle).
    """
    states = vision_hidden_states(model, pixel_values, prefixes)
    return project_features(model, select_image_features(model, states), prefixes)


@dataclass
class DecodeState:
    """The running batch's cache: HF DynamicCache + 2D attention mask + next RoPE position per row."""

    cache: DynamicCache  # layers hold [B, Hkv, S, hd]
    attention_mask: Tensor  # [B, S] long, 1 = attend
    positions: Tensor  # [B] long, position id of each row's next token

    @property
    def batch_size(self) -> int:
        return int(self.attention_mask.shape[0])

    def select(self, rows: Sequence[int]) -> DecodeState:
        """Keep `rows` (in that order) and drop leading columns no remaining row attends to."""
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, idx)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        for layer in self.cache.layers:
            keys, values = layer_states(layer)
            set_layer_states(
                layer, keys.index_select(0, idx)[:, :, start:], values.index_select(0, idx)[:, :, start:]
            )
        return DecodeState(self.cache, mask[:, start:], self.positions.index_select(0, idx))

    @property
    def growable(self) -> bool:
        """True when every layer grows in place (serving), so rows can join and leave without re-packing."""
        layers = self.cache.layers
        return bool(layers) and all(
            isinstance(layer, GrowableLayer) and layer.is_initialized for layer in layers
        )

    def growable_layers(self) -> list[GrowableLayer]:
        """The cache's layers as `GrowableLayer`s (TypeError if one is not: only for `growable` states)."""
        layers = list(self.cache.layers)
        if not all(isinstance(layer, GrowableLayer) for layer in layers):
            raise TypeError("this DecodeState's cache does not grow in place")
        return [layer for layer in layers if isinstance(layer, GrowableLayer)]

    def remove_rows(self, rows: Sequence[int], compact_at: int = 128) -> list[int]:
        """Drop `rows` IN PLACE; returns the old index of each remaining row in its new position.

        Growable caches swap-remove (the last row fills the hole, one row copied); leading positions no row
        attends to any more are dropped once there are `compact_at` of them. Other caches fall back to `select`.
        """
        order = swap_remove_order(self.batch_size, rows)
        if not self.growable or not order:
            kept = [i for i in range(self.batch_size) if i not in set(rows)]
            new = self.select(kept) if kept else self
            self.attention_mask, self.positions = new.attention_mask, new.positions
            return kept
        for layer in self.growable_layers():
            layer.remove_rows(rows)
        idx = torch.tensor(order, dtype=torch.long, device=self.attention_mask.device)
        self.attention_mask = self.attention_mask.index_select(0, idx)
        self.positions = self.positions.index_select(0, idx)
        used = self.attention_mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start >= compact_at:
            for layer in self.growable_layers():
                layer.drop_leading(start)
            self.attention_mask = self.attention_mask[:, start:]
        return order

    def extend(self, others: Sequence[DecodeState]) -> bool:
        """Append the rows of `others` IN PLACE when they fit (growable caches, no longer than this batch);
        returns False (nothing changed) otherwise, and the caller uses `merge`."""
        length = self.attention_mask.shape[1]
        if not self.growable or any(not o.growable or o.attention_mask.shape[1] > length for o in others):
            return False
        for other in others:
            for layer, new in zip(self.growable_layers(), other.growable_layers(), strict=True):
                layer.append_rows(*layer_states(new))
            pad = length - other.attention_mask.shape[1]
            mask = nn.functional.pad(other.attention_mask, (pad, 0))
            self.attention_mask = torch.cat([self.attention_mask, mask])
            self.positions = torch.cat([self.positions, other.positions])
        return True

    def checkpoint(self) -> tuple[Tensor, Tensor, list[int]] | None:
        """What `rollback` needs to undo a decode step that raised half-way (None: not undoable)."""
        if not self.growable:
            return None
        return self.attention_mask, self.positions, [layer.length for layer in self.growable_layers()]

    def rollback(self, checkpoint: tuple[Tensor, Tensor, list[int]]) -> None:
        """Back to `checkpoint` (the positions a failed step wrote are forgotten)."""
        self.attention_mask, self.positions, lengths = checkpoint
        for layer, length in zip(self.growable_layers(), lengths, strict=True):
            layer.truncate(length)

    def row_copy(self, row: int) -> DecodeState:
        """A one-row copy of row `row` (its own cache; for retrying one row alone)."""
        cache = copy.copy(self.cache)
        cache.layers = [
            GrowableLayer(keys[row : row + 1], values[row : row + 1])
            for keys, values in map(layer_states, self.cache.layers)
        ]
        return DecodeState(cache, self.attention_mask[row : row + 1], self.positions[row : row + 1])

    @staticmethod
    def merge(states: Sequence[DecodeState]) -> DecodeState:
        """Concatenate batches, left-padding shorter caches and masks (padding is masked, so results are unchanged)."""
        if len(states) == 1:
            return states[0]
        length = max(s.attention_mask.shape[1] for s in states)
        masks = [nn.functional.pad(s.attention_mask, (length - s.attention_mask.shape[1], 0)) for s in states]
        base = states[0].cache
        for layer_idx, layer in enumerate(base.layers):
            pairs = [layer_states(s.cache.layers[layer_idx]) for s in states]
            keys, values = (
                torch.cat([nn.functional.pad(t, (0, 0, length - t.shape[2], 0)) for t in tensors])
                for tensors in zip(*pairs, strict=True)
            )
            set_layer_states(layer, keys, values)
        return DecodeState(base, torch.cat(masks), torch.cat([s.positions for s in states]))


def _embed_rows(model: nn.Module, rows: Sequence[RowInput]) -> tuple[Tensor, Tensor]:
    """Left-pad token ids, embed them and scatter image features. Returns embeds [B, T, D] and mask [B, T]."""
    device = next(hf.part(model, "lm_head").parameters()).device
    length = max(int(r.input_ids.shape[0]) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    for b, row in enumerate(rows):
        n = int(row.input_ids.shape[0])
        ids[b, length - n :] = row.input_ids.to(device)
        mask[b, length - n :] = 1
    embeds = hf.input_embeddings(model)(ids)  # [B, T, D]
    image_slots = (ids == hf.config(model).image_token_id) & mask.bool()
    features = [r.image_features for r in rows if r.image_features is not None]
    want = int(image_slots.sum())
    have = sum(int(f.shape[0]) for f in features)
    if want != have:
        raise ValueError(f"{want} image placeholder tokens but {have} image feature rows")
    if want:
        flat = torch.cat([f.to(embeds.dtype) for f in features])  # [sum N, D]
        embeds = embeds.masked_scatter(image_slots[..., None].expand_as(embeds), flat)
    return embeds, mask


def _prefix_cache(
    model: nn.Module, rows: Sequence[RowInput], like: Tensor, room: int
) -> tuple[DynamicCache, Tensor, Tensor]:
    """A cache prefilled with each row's text prefix, its mask [B, P] and each row's prefix length [B].

    Without autograd (serving) the layers grow in place with `room` free positions (see `m2pt.cache`)."""
    from transformers import DynamicCache

    parts = [None if r.prefix is None else r.prefix.text_kv() for r in rows]
    lengths = torch.tensor([0 if p is None else p[0].shape[2] for p in parts], device=like.device)
    stacked = _stack_prefixes(parts, like)
    config = hf.config(model)
    cache = DynamicCache(config=config)
    mask = like.new_zeros(len(rows), 0, dtype=torch.long)
    if stacked is not None:
        keys, values, bias = stacked
        cache = DynamicCache(
            ddp_cache_data=[(keys[i], values[i]) for i in range(keys.shape[0])], config=config
        )
        mask = (bias == 0).long()
    if not torch.is_grad_enabled():
        cache.layers = [
            GrowableLayer(*layer_states(layer), headroom=room)
            if getattr(layer, "is_initialized", False)
            else GrowableLayer()
            for layer in cache.layers
        ]
    return cache, mask, lengths


def prefill(
    model: nn.Module, rows: Sequence[RowInput], all_logits: bool = False
) -> tuple[Tensor, DecodeState]:
    """Run the prompt of every row. Returns logits ([B, V] of the last token, or [B, T, V] left-padded when
    `all_logits`) and the `DecodeState` to continue decoding from."""
    embeds, text_mask = _embed_rows(model, rows)
    cache, prefix_mask, prefix_len = _prefix_cache(model, rows, embeds, room=embeds.shape[1] + 64)
    attention_mask = torch.cat([prefix_mask, text_mask], dim=1)  # [B, P+T]
    position_ids = (prefix_len[:, None] + text_mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
    out = hf.part(model, "model.language_model")(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
    )
    hidden = out.last_hidden_state if all_logits else out.last_hidden_state[:, -1]
    state = DecodeState(cache, attention_mask, position_ids[:, -1] + 1)  # the cache was filled in place
    return hf.part(model, "lm_head")(hidden), state


def chunk_image_features(row: RowInput, start: int, end: int, image_token_id: int) -> Tensor | None:
    """The rows of `row.image_features` that fill the placeholders in `input_ids[start:end]` ([n, D] or None).

    Placeholders before `start` are counted to find the offset; raises `ValueError` when the row has not as
    many feature rows as placeholder tokens (checked on the whole row, so the first chunk already refuses
    it)."""
    slots = row.input_ids == image_token_id  # [T]
    have = 0 if row.image_features is None else int(row.image_features.shape[0])
    want = int(slots.sum())
    if want != have:
        raise ValueError(f"{want} image placeholder tokens but {have} image feature rows")
    before, inside = int(slots[:start].sum()), int(slots[start:end].sum())
    if inside == 0 or row.image_features is None:
        return None
    return row.image_features[before : before + inside]


def chunk_embeds(model: nn.Module, row: RowInput, start: int, end: int) -> Tensor:
    """Input embeddings [1, C, D] of `input_ids[start:end]`, with the row's image features in its placeholders."""
    device = next(hf.part(model, "lm_head").parameters()).device
    image_token_id = int(hf.config(model).image_token_id)
    ids = row.input_ids[start:end].to(device)[None]  # [1, C]
    embeds = hf.input_embeddings(model)(ids)  # [1, C, D]
    features = chunk_image_features(row, start, end, image_token_id)
    if features is not None:
        slots = (ids == image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))
    return embeds


def first_chunk_state(model: nn.Module, row: RowInput, like: Tensor) -> DecodeState:
    """The state a row's chunked prefill starts from: its cache holding only the bundle's text prefix (with
    room for the whole prompt), the prefix's mask [1, P] and the position of the first prompt token."""
    cache, mask, next_position = _prefix_cache(model, [row], like, room=int(row.input_ids.shape[0]) + 64)
    return DecodeState(cache, mask, next_position)


def prefill_chunk(
    model: nn.Module, row: RowInput, start: int, end: int, state: DecodeState | None = None
) -> tuple[Tensor, DecodeState]:
    """Feed the prompt tokens `input_ids[start:end]` of ONE row, appended to its cache (chunked prefill).

    `state` is None for the first chunk (`start == 0`): the row's cache then starts with its bundle's text
    prefix, exactly as `prefill` builds it. Positions continue where `state` left off, so prefilling a prompt
    in any chunking gives the same logits as `prefill` on the whole prompt (tests/test_engine_chunked.py,
    1e-5 fp32). Returns the logits of the chunk's last token [1, V] and the row's state (a batch of one,
    advanced in place). Inference only (the cache grows in place)."""
    if (state is None) != (start == 0) or not 0 <= start < end <= int(row.input_ids.shape[0]):
        raise ValueError(f"bad chunk [{start}, {end}) of a {row.input_ids.shape[0]}-token prompt")
    device = next(hf.part(model, "lm_head").parameters()).device
    embeds = chunk_embeds(model, row, start, end)  # [1, C, D]
    state = state if state is not None else first_chunk_state(model, row, embeds)
    cache, mask, next_position = state.cache, state.attention_mask, state.positions  # mask [1, S]
    chunk = end - start
    attention_mask = torch.cat([mask, mask.new_ones(1, chunk)], dim=1)  # [1, S+C]
    position_ids = next_position[:, None] + torch.arange(chunk, device=device)[None]  # [1, C]
    out = hf.part(model, "model.language_model")(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
    )
    new_state = DecodeState(cache, attention_mask, position_ids[:, -1] + 1)
    return hf.part(model, "lm_head")(out.last_hidden_state[:, -1]), new_state


def decode_step(model: nn.Module, state: DecodeState, tokens: Tensor) -> Tensor:
    """Feed one token per row ([B] long); returns next-token logits [B, V] and advances `state` in place."""
    state.attention_mask = nn.functional.pad(state.attention_mask, (0, 1), value=1)
    embeds = hf.input_embeddings(model)(tokens[:, None])  # [B, 1, D]
    out = hf.part(model, "model.language_model")(
        inputs_embeds=embeds,
        attention_mask=state.attention_mask,
        position_ids=state.positions[:, None],
        cache=state.cache,
        use_cache=True,
    )
    state.positions = state.positions + 1
    return hf.part(model, "lm_head")(out.last_hidden_state[:, -1])
