"""One LLM forward for a whole engine step: the decode rows' next tokens and any prompt chunks, packed together.

Without this a step with prompt work runs the LLM twice or more (one forward per prompt chunk, then one for the
decode batch), and on a CPU every forward pays for reading all the weights once. Packing is vLLM's layout:

    hidden [1, N, D] = [decode token of row 0 .. row B-1 | chunk 0 tokens | chunk 1 tokens | ...]

Everything in a decoder layer but attention acts per token, so it runs once over all N tokens. Attention is the
only place where tokens of different rows meet; `packed_sdpa_attention` (registered with transformers and set on
the LLM's config by `install_packed_attention`) computes it segment by segment: the decode segment as a batch of
B one-token queries over the decode batch's cache, each chunk over its own row cache with a causal mask. The
segments' keys and values are appended to their own caches by `PackedCache.update`, exactly what the separate
forwards would write, so `packed_step` == `prefill_chunk` per chunk + `decode_step` (tests/test_engine_packed.py,
1e-5 fp32). Outside `packed_step` the attention function is plain SDPA, so training and every other forward are
unchanged.

Inference only (the caches grow in place). Llama-style LLMs with full attention in every layer (Llama, Qwen2,
Qwen3, Mistral without a sliding window): `supports_packing` says whether a model is one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from m2pt import hf
from m2pt.forward import DecodeState, RowInput, chunk_embeds, first_chunk_state

ATTN_NAME = "m2pt_packed_sdpa"
_STEP: ContextVar[PackedCache | None] = ContextVar("m2pt_packed_step", default=None)


@dataclass
class ChunkInput:
    """Prompt tokens [start, end) of one row, appended to `state` (None: the row's first chunk)."""

    row: RowInput
    start: int
    end: int
    state: DecodeState | None


class PackedCache:
    """The cache the LLM sees during a packed forward: splits each layer's new keys/values [1, Hkv, N, hd] into
    the segments' caches and keeps what each segment must attend to for `packed_sdpa_attention`.

    Segment 0 is the decode batch (its B tokens, one per row; may be empty); then one segment per chunk."""

    def __init__(
        self, decode: DecodeState | None, chunks: Sequence[DecodeState], chunk_lengths: Sequence[int]
    ):
        self.decode = decode
        self.chunks = list(chunks)
        self.chunk_lengths = list(chunk_lengths)
        self.num_decode = 0 if decode is None else decode.batch_size
        self.masks: list[Tensor] = []  # per segment: bool [b, 1, q, kv], True = attend
        self._decode_layers = [] if decode is None else decode.growable_layers()
        self._chunk_layers = [state.growable_layers() for state in self.chunks]
        self._kv: dict[int, list[tuple[Tensor, Tensor]]] = {}

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        """Append each segment's new keys/values [1, Hkv, n, hd] to its cache; returns the packed inputs."""
        segments = []
        offset = 0
        if self.decode is not None:
            b = self.num_decode
            new_k = keys[0, :, :b].transpose(0, 1)[:, :, None]  # [B, Hkv, 1, hd]
            new_v = values[0, :, :b].transpose(0, 1)[:, :, None]
            segments.append(self._decode_layers[layer_idx].update(new_k, new_v))
            offset = b
        for layers, length in zip(self._chunk_layers, self.chunk_lengths, strict=True):
            piece_k, piece_v = keys[:, :, offset : offset + length], values[:, :, offset : offset + length]
            segments.append(layers[layer_idx].update(piece_k, piece_v))  # [1, Hkv, S+C, hd]
            offset += length
        self._kv[layer_idx] = segments
        return keys, values

    def segments(self, layer_idx: int) -> list[tuple[Tensor, Tensor]]:
        return self._kv.pop(layer_idx)


@contextmanager
def _bound(step: PackedCache) -> Iterator[None]:
    token = _STEP.set(step)
    try:
        yield
    finally:
        _STEP.reset(token)


def packed_sdpa_attention(
    module: nn.Module,
    query: Tensor,  # [b, H, T, hd]
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """SDPA; inside `packed_step`, per segment of the packed step (see the module docstring)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    step = _STEP.get()
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    outputs = []  # each [1, n, H, hd]
    offset = 0
    layer_idx: int = getattr(module, "layer_idx")  # noqa: B009 (typed as int, not Tensor | Module)
    for (seg_k, seg_v), mask in zip(step.segments(layer_idx), step.masks, strict=True):
        rows, q_len = mask.shape[0], mask.shape[2]
        n = rows * q_len
        q = query[0, :, offset : offset + n]  # [H, n, hd]
        q = q.transpose(0, 1)[:, :, None] if q_len == 1 else q[None]  # [rows, H, q_len, hd]
        out, _ = sdpa_attention_forward(module, q, seg_k, seg_v, mask, is_causal=False, **kwargs)
        outputs.append(out.reshape(1, n, *out.shape[2:]))  # [rows, q_len, H, hd] -> [1, n, H, hd]
        offset += n
    return torch.cat(outputs, dim=1), None


def _decode_mask(state: DecodeState) -> Tensor:
    """bool [B, 1, 1, S] of the decode batch after this step's token was appended to its 2D mask."""
    return state.attention_mask.bool()[:, None, None, :]


def _chunk_mask(mask_2d: Tensor, length: int) -> Tensor:
    """bool [1, 1, C, S] for a chunk of `length` tokens at the end of a row whose 2D mask (incl. them) is
    `mask_2d` [1, S]: token i attends to every unmasked position up to its own."""
    total = mask_2d.shape[1]
    own = torch.arange(total - length, total, device=mask_2d.device)[:, None]  # [C, 1]
    causal = torch.arange(total, device=mask_2d.device)[None, :] <= own  # [C, S]
    return (causal & mask_2d.bool())[None, None]


def supports_packing(model: nn.Module) -> bool:
    """True when `install_packed_attention` switched the model's LLM to the packed attention."""
    return (
        getattr(hf.config(hf.part(model, "model.language_model")), "_attn_implementation", None) == ATTN_NAME
    )


def install_packed_attention(model: nn.Module) -> bool:
    """Switch the LLM of `model` to `packed_sdpa_attention` (plain SDPA outside a packed step) when every layer
    uses full attention; returns whether it did (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    language_model = hf.part(model, "model.language_model")
    config = hf.config(language_model)
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    if getattr(config, "_attn_implementation", None) not in ("sdpa", ATTN_NAME):
        return False
    if any(kind != "full_attention" for kind in layer_types) or _sliding_window(config) is not None:
        return False
    AttentionInterface.register(ATTN_NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    config._attn_implementation = ATTN_NAME
    for module in language_model.modules():
        module_config = getattr(module, "config", None)
        if module_config is not None and module_config is not config:
            module_config._attn_implementation = ATTN_NAME
    return True


def _sliding_window(config: Any) -> int | None:
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)


def packed_step(
    model: nn.Module, decode: DecodeState | None, tokens: Tensor | None, chunks: Sequence[ChunkInput]
) -> tuple[Tensor | None, list[Tensor], list[DecodeState]]:
    """One LLM forward for the decode batch (`tokens` [B] long, one per row of `decode`) and `chunks`.

    Returns the decode rows' next-token logits [B, V] (None without decode rows), each chunk's last-token logits
    [1, V] and each chunk row's state, exactly as `decode_step` and `prefill_chunk` would; `decode` and the
    chunks' states advance in place. On an exception the caches may hold part of the step: the caller rolls
    them back (`DecodeState.checkpoint`/`rollback`)."""
    if not supports_packing(model):
        raise ValueError("this model's LLM does not use the packed attention (install_packed_attention)")
    device = next(hf.part(model, "lm_head").parameters()).device
    embeds, positions, states, masks = [], [], [], []
    if decode is not None and tokens is not None:
        decode.attention_mask = nn.functional.pad(decode.attention_mask, (0, 1), value=1)
        embeds.append(hf.input_embeddings(model)(tokens.to(device))[None])  # [1, B, D]
        positions.append(decode.positions)
        masks.append(_decode_mask(decode))
    for chunk in chunks:
        piece = chunk_embeds(model, chunk.row, chunk.start, chunk.end)  # [1, C, D]
        state = chunk.state if chunk.state is not None else first_chunk_state(model, chunk.row, piece)
        length = chunk.end - chunk.start
        state.attention_mask = torch.cat(
            [state.attention_mask, state.attention_mask.new_ones(1, length)], dim=1
        )
        embeds.append(piece)
        positions.append(state.positions + torch.arange(length, device=device))
        masks.append(_chunk_mask(state.attention_mask, length))
        states.append(state)
    step = PackedCache(decode, states, [c.end - c.start for c in chunks])
    step.masks = masks
    hidden = torch.cat(embeds, dim=1)  # [1, N, D]
    position_ids = torch.cat(positions)[None]  # [1, N]
    placeholder = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)  # 4D: HF builds no mask of its own
    with _bound(step):
        out = hf.part(model, "model.language_model")(
            inputs_embeds=hidden,
            attention_mask=placeholder,
            position_ids=position_ids,
            cache=step,
            use_cache=True,
        )
    last = _last_positions(step).to(device)
    logits = hf.part(model, "lm_head")(out.last_hidden_state[0, last])  # [B + chunks, V]
    b = step.num_decode
    if decode is not None:
        decode.positions = decode.positions + 1
    for state, chunk in zip(states, chunks, strict=True):
        state.positions = state.positions + (chunk.end - chunk.start)
    return (
        (logits[:b] if decode is not None else None),
        [logits[b + i][None] for i in range(len(chunks))],
        states,
    )


def _last_positions(step: PackedCache) -> Tensor:
    """Indices into the packed tokens of every decode token and of each chunk's last token."""
    idx = list(range(step.num_decode))
    offset = step.num_decode
    for length in step.chunk_lengths:
        offset += length
        idx.append(offset - 1)
    return torch.tensor(idx, dtype=torch.long)
