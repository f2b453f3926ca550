"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP tower (every layer, then `post_layernorm`), an avg-pool
+ RMSNorm + matmul projector, a Gemma 3 LLM with local (sliding-window) and global layers that use different
RoPE bases, and bidirectional attention among the tokens of one image.

Where prompts sit:
- visual prompts: a K/V prefix in every SigLIP layer (as plain LLaVA; all layers run, since Gemma 3 reads the
  last one through `post_layernorm`), per image, under the image's bundle; the bundle's projector replaces
  `multi_modal_projector` (`mm_input_projection_weight`, `mm_soft_emb_norm.weight`).
- textual prompts: a K/V prefix at RoPE positions 0..Lt-1 of each layer, with that layer's RoPE (local or
  global); they are text (not image) tokens, so they are seen causally, and by local layers only within the
  window.

The masks are built here, per row, from positions (not cache columns), so left padding, prefixes of different
lengths and mixed batches give what each row alone gives: global layers OR(causal, same-image block), local
layers AND(window, OR(causal, same-image block)), as HF's `create_masks_for_vision_model`. The cache keeps
every key for every layer (local layers are masked, not truncated).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from m2pt import hf
from m2pt.families.base import ImageInput, ModelFamily, UnsupportedModelError
from m2pt.spec import ModelSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from m2pt.forward import DecodeState, RowInput
    from m2pt.prefix import BundlePrefix
    from m2pt.prompts import PromptTensors

NEG_INF = float("-inf")


def _require(ok: bool, model_id: str, what: str) -> None:
    if not ok:
        raise UnsupportedModelError(f"{model_id}: {what}")


def image_blocks(ids: Tensor, mask: Tensor, image_token_id: int) -> Tensor:
    """Per token, the index of the image run it belongs to (consecutive image tokens), else -1. [B, T]"""
    is_image = (ids == image_token_id) & mask.bool()
    starts = is_image & ~nn.functional.pad(is_image, (1, 0))[:, :-1]
    return torch.where(is_image, starts.long().cumsum(-1) - 1, -1)


def attention_masks(
    kv_mask: Tensor, q_pos: Tensor, q_block: Tensor, kv_block: Tensor, window: int, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Additive masks `{"full_attention", "sliding_attention"}` [B, 1, Tq, S].

    kv_mask [B, S] (1 = a real key), q_pos [B, Tq] (RoPE positions), q_block [B, Tq] / kv_block [B, S] (image
    run or -1). A key's position is its rank among the row's real keys. Padding queries see themselves only.
    """
    kv_pos = kv_mask.cumsum(-1) - 1  # [B, S]
    real = kv_mask.bool()[:, None, :]  # [B, 1, S]
    causal = kv_pos[:, None, :] <= q_pos[:, :, None]  # [B, Tq, S]
    same_image = (q_block[:, :, None] == kv_block[:, None, :]) & (q_block[:, :, None] >= 0)
    full = real & (causal | same_image)
    local = full & (q_pos[:, :, None] - kv_pos[:, None, :] < window)
    own = torch.zeros_like(full)
    tq = q_pos.shape[1]
    own[:, torch.arange(tq), torch.arange(kv_mask.shape[1] - tq, kv_mask.shape[1])] = True  # the query itself

    def additive(allowed: Tensor) -> Tensor:
        allowed = torch.where(allowed.any(-1, keepdim=True), allowed, own)
        zero = torch.zeros((), dtype=dtype, device=kv_mask.device)
        return torch.where(allowed, zero, torch.tensor(NEG_INF, dtype=dtype, device=kv_mask.device))[:, None]

    return {"full_attention": additive(full), "sliding_attention": additive(local)}


def _prefix_cache(rows: Sequence[RowInput], like: Tensor, room: int) -> tuple[Any, Tensor, Tensor]:
    """Cache with each row's text prefix in every layer (all full layers: nothing is truncated), its mask
    [B, P] and the prefix lengths [B]. Without autograd (serving) the layers grow in place (`m2pt.cache`)."""
    from transformers import DynamicCache

    from m2pt.cache import GrowableLayer
    from m2pt.forward import _stack_prefixes

    parts: list[tuple[Tensor, Tensor] | None] = []
    for row in rows:
        prefix = row.prefix
        has_text = prefix is not None and prefix.text_k is not None and prefix.text_v is not None
        parts.append((prefix.text_k, prefix.text_v) if has_text else None)  # type: ignore[union-attr,arg-type]
    lengths = torch.tensor([0 if p is None else p[0].shape[2] for p in parts], device=like.device)
    stacked = _stack_prefixes(parts, like)
    mask = like.new_zeros(len(rows), 0, dtype=torch.long)
    serving = not torch.is_grad_enabled()
    cache: Any = DynamicCache()  # no config: plain (untruncated) layers for local and global layers alike
    if stacked is not None:
        keys, values, bias = stacked
        if serving:
            cache.layers = [GrowableLayer(keys[i], values[i], headroom=room) for i in range(keys.shape[0])]
        else:
            cache = DynamicCache(ddp_cache_data=[(keys[i], values[i]) for i in range(keys.shape[0])])
        mask = (bias == 0).long()
    if serving:
        cache.layer_class_to_replicate = GrowableLayer
    return cache, mask, lengths


def _logits(model: nn.Module, hidden: Tensor) -> Tensor:
    logits = hf.part(model, "lm_head")(hidden)
    cap = getattr(hf.config(model).text_config, "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


class Gemma3Family(ModelFamily):
    """Gemma 3 with a SigLIP tower."""

    name = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)

    def model_class(self) -> type[PreTrainedModel]:
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration

    def check_config(self, config: Any, model_id: str) -> None:
        tower = getattr(config.vision_config, "model_type", None)
        _require(tower == "siglip_vision_model", model_id, f"Gemma 3 vision tower {tower!r} is not supported")
        text = getattr(config.text_config, "model_type", None)
        _require(text == "gemma3_text", model_id, f"Gemma 3 language model {text!r} is not supported")
        _require(
            not getattr(config.text_config, "use_bidirectional_attention", False),
            model_id,
            "Gemma 3 with use_bidirectional_attention (an encoder) is not supported",
        )

    def check_modules(self, model: nn.Module, model_id: str) -> None:
        from m2pt.families.llava import _check_attention

        cfg = hf.config(model)
        tower = hf.part(model, "model.vision_tower")
        _require(
            type(tower).__name__ == "SiglipVisionModel", model_id, f"vision tower is {type(tower).__name__}"
        )
        _require(hf.has_part(tower, "post_layernorm"), model_id, "the SigLIP tower has no post_layernorm")
        for i, layer in enumerate(hf.layers(tower, "encoder.layers")):
            _require(hf.has_part(layer, "layer_norm1"), model_id, f"ViT layer {i} has no layer_norm1")
            heads = int(cfg.vision_config.num_attention_heads)
            _check_attention(hf.part(layer, "self_attn"), heads, model_id, f"ViT layer {i}")
        kv_heads = int(cfg.text_config.num_key_value_heads)
        _require(hf.has_part(model, "model.language_model.rotary_emb"), model_id, "the LLM has no rotary_emb")
        for i, layer in enumerate(hf.layers(model, "model.language_model.layers")):
            _require(hf.has_part(layer, "input_layernorm"), model_id, f"LLM layer {i} has no input_layernorm")
            _require(hf.has_part(layer, "self_attn.k_norm"), model_id, f"LLM layer {i} has no k_norm")
            _check_attention(hf.part(layer, "self_attn"), kv_heads, model_id, f"LLM layer {i}")
        _require(hf.has_part(model, "model.multi_modal_projector"), model_id, "no multi_modal_projector")

    def prepare(self, model: nn.Module) -> None:
        from m2pt.attention import install_prefix_attention

        install_prefix_attention(model)

    def spec_from_model(self, model: nn.Module, model_id: str) -> ModelSpec:
        cfg = hf.config(model)
        vcfg, tcfg = cfg.vision_config, cfg.text_config
        proj = hf.part(model, "model.multi_modal_projector").state_dict()
        return ModelSpec(
            model_id=model_id,
            vit_layers=int(vcfg.num_hidden_layers),
            vit_dim=int(vcfg.hidden_size),
            vit_heads=int(vcfg.num_attention_heads),
            llm_layers=int(tcfg.num_hidden_layers),
            llm_dim=int(tcfg.hidden_size),
            llm_heads=int(tcfg.num_attention_heads),
            llm_kv_heads=int(tcfg.num_key_value_heads),
            llm_head_dim=int(tcfg.head_dim),
            vocab_size=int(tcfg.vocab_size),
            image_token_id=int(cfg.image_token_id),
            image_size=int(vcfg.image_size),
            patch_size=int(vcfg.patch_size),
            num_image_tokens=int(cfg.mm_tokens_per_image),
            projector_shapes={k: tuple(v.shape) for k, v in proj.items()},
            family=self.name,
            extras={"layer_types": list(tcfg.layer_types), "sliding_window": int(tcfg.sliding_window)},
        )

    def projector(self, model: nn.Module) -> nn.Module:
        return hf.part(model, "model.multi_modal_projector")

    def compute_prefix(self, model: nn.Module, prompts: PromptTensors) -> BundlePrefix:
        from m2pt.prefix import compute_prefix

        return compute_prefix(model, prompts)  # text K/V take each layer's own RoPE (local or global)

    def split_images(self, encoded: Mapping[str, Any]) -> list[ImageInput]:
        return [ImageInput(px) for px in encoded["pixel_values"]]  # each [3, H, W]

    def encode_images(
        self, model: nn.Module, images: Sequence[ImageInput], prefixes: Sequence[BundlePrefix | None]
    ) -> list[Tensor]:
        from m2pt.forward import vision_hidden_states

        if not images:
            return []
        tower = hf.part(model, "model.vision_tower")
        pixels = torch.stack([im.pixel_values for im in images]).to(hf.param_dtype(tower))  # [M, 3, H, W]
        pixels = pixels.to(next(model.parameters()).device)
        layers = int(hf.config(model).vision_config.num_hidden_layers)
        last = hf.part(tower, "post_layernorm")(vision_hidden_states(model, pixels, prefixes, layers)[-1])
        projector = self.projector(model)
        out = []
        for i, prefix in enumerate(prefixes):  # per image: its bundle's projector or the base one
            feats = last[i : i + 1]
            weights = None if prefix is None else prefix.projector
            out.append(
                (projector(feats) if weights is None else functional_call(projector, weights, (feats,)))[0]
            )
        return out  # M x [mm_tokens, D]

    def prefill(
        self, model: nn.Module, rows: Sequence[RowInput], all_logits: bool = False
    ) -> tuple[Tensor, DecodeState]:
        from m2pt.forward import DecodeState, _embed_rows

        embeds, text_mask = _embed_rows(model, rows)  # [B, T, D], [B, T]
        cache, prefix_mask, prefix_len = _prefix_cache(rows, embeds, room=embeds.shape[1] + 64)
        kv_mask = torch.cat([prefix_mask, text_mask], dim=1)  # [B, P+T]
        positions = (prefix_len[:, None] + text_mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        ids = torch.stack(
            [nn.functional.pad(r.input_ids, (embeds.shape[1] - r.input_ids.shape[0], 0)) for r in rows]
        )
        blocks = image_blocks(ids.to(embeds.device), text_mask, int(hf.config(model).image_token_id))
        kv_block = torch.cat([torch.full_like(prefix_mask, -1), blocks], dim=1)
        window = int(hf.config(model).text_config.sliding_window)
        masks = attention_masks(kv_mask, positions, blocks, kv_block, window, embeds.dtype)
        lm = hf.part(model, "model.language_model")
        out = lm(
            inputs_embeds=embeds, attention_mask=masks, position_ids=positions, cache=cache, use_cache=True
        )
        hidden = out.last_hidden_state if all_logits else out.last_hidden_state[:, -1]
        return _logits(model, hidden), DecodeState(cache, kv_mask, positions[:, -1] + 1)

    def prefill_spans(self, model: nn.Module, input_ids: Tensor) -> list[tuple[int, int]]:
        """Each image's run of placeholder tokens: prefilled in one chunk (bidirectional attention)."""
        is_image = (input_ids == int(hf.config(model).image_token_id)).tolist()
        spans: list[tuple[int, int]] = []
        for i, flag in enumerate(is_image):
            if flag and (i == 0 or not is_image[i - 1]):
                spans.append((i, i))
            if flag:
                spans[-1] = (spans[-1][0], i + 1)
        return spans

    def chunk_end(self, model: nn.Module, row: RowInput, end: int) -> int:
        """The first chunk boundary at or after `end` that does not split an image: the tokens of one image
        attend to each other both ways, so an image must be prefilled in one chunk."""
        is_image = (row.input_ids == int(hf.config(model).image_token_id)).tolist()
        while 0 < end < len(is_image) and is_image[end - 1] and is_image[end]:
            end += 1
        return end

    def prefill_chunk(
        self, model: nn.Module, row: RowInput, start: int, end: int, state: DecodeState | None = None
    ) -> tuple[Tensor, DecodeState]:
        """Feed `input_ids[start:end]` of ONE row after `state` (None: first chunk, the bundle's text prefix
        is the cache). Any chunking that does not split an image (`chunk_end`) gives `prefill`'s logits; one
        that splits an image raises `ValueError`. Returns the chunk's last logits [1, V] and the row's
        state."""
        from m2pt.forward import DecodeState

        ids_all = row.input_ids
        if (state is None) != (start == 0) or not 0 <= start < end <= int(ids_all.shape[0]):
            raise ValueError(f"bad chunk [{start}, {end}) of a {ids_all.shape[0]}-token prompt")
        image_id = int(hf.config(model).image_token_id)
        if self.chunk_end(model, row, end) != end or self.chunk_end(model, row, start) != start:
            raise ValueError(f"Gemma 3: the prefill chunk [{start}, {end}) splits an image; see chunk_end")
        device = next(model.parameters()).device
        ids = ids_all[start:end].to(device)[None]  # [1, C]
        embeds = hf.input_embeddings(model)(ids)  # [1, C, D]
        slots = ids_all == image_id
        before, inside = int(slots[:start].sum()), int(slots[start:end].sum())
        if inside:
            assert row.image_features is not None
            feats = row.image_features[before : before + inside].to(embeds.dtype)
            embeds = embeds.masked_scatter((ids == image_id)[..., None].expand_as(embeds), feats)
        if state is None:
            cache, mask, next_pos = _prefix_cache([row], embeds, room=int(ids_all.shape[0]) + 64)
        else:
            cache, mask, next_pos = state.cache, state.attention_mask, state.positions
        chunk = end - start
        kv_mask = torch.cat([mask, mask.new_ones(1, chunk)], dim=1)  # [1, S+C]
        q_pos = next_pos[:, None] + torch.arange(chunk, device=device)[None]  # [1, C]
        q_block = image_blocks(ids, torch.ones_like(ids), image_id)
        kv_block = torch.cat([torch.full_like(mask, -1), q_block], dim=1)
        window = int(hf.config(model).text_config.sliding_window)
        masks = attention_masks(kv_mask, q_pos, q_block, kv_block, window, embeds.dtype)
        lm = hf.part(model, "model.language_model")
        out = lm(inputs_embeds=embeds, attention_mask=masks, position_ids=q_pos, cache=cache, use_cache=True)
        return _logits(model, out.last_hidden_state[:, -1]), DecodeState(cache, kv_mask, q_pos[:, -1] + 1)

    def decode_step(self, model: nn.Module, state: DecodeState, tokens: Tensor) -> Tensor:
        state.attention_mask = nn.functional.pad(state.attention_mask, (0, 1), value=1)
        embeds = hf.input_embeddings(model)(tokens[:, None])  # [B, 1, D]
        q_pos = state.positions[:, None]
        none = torch.full_like(q_pos, -1)
        window = int(hf.config(model).text_config.sliding_window)
        kv_block = torch.full_like(state.attention_mask, -1)
        masks = attention_masks(state.attention_mask, q_pos, none, kv_block, window, embeds.dtype)
        lm = hf.part(model, "model.language_model")
        out = lm(
            inputs_embeds=embeds, attention_mask=masks, position_ids=q_pos, cache=state.cache, use_cache=True
        )
        state.positions = state.positions + 1
        return _logits(model, out.last_hidden_state[:, -1])


GEMMA3 = Gemma3Family()
