"""What the runner needs from a model family, as ONE object (`ModelOps`), and LLaVA's implementation.

A family adapter (m2pt/families/...) can provide its own `ModelOps`; `build_engine(..., ops=...)` takes it, so a
new family plugs in without touching the engine. All methods run on the engine loop thread under
`torch.inference_mode()`. The contract is in this module's `ModelOps` docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from m2pt.forward import DecodeState, RowInput, decode_step, encode_images, prefill_chunk
from m2pt.packed import ChunkInput, packed_step, supports_packing
from m2pt.prefix import BundlePrefix, compute_prefix
from m2pt.prompts import PromptTensors


class ModelOps(Protocol):
    device: torch.device

    def compute_prefix(self, prompts: PromptTensors) -> BundlePrefix:
        """A bundle's per-layer K/V (precomputed once per bundle)."""
        ...

    def encode_images(
        self, pixels: Sequence[Tensor], prefixes: Sequence[BundlePrefix | None]
    ) -> list[Tensor]:
        """One entry per image (its processor output) -> that image's features [n_tokens, D]."""
        ...

    def prefill_chunk(self, row: RowInput, start: int, end: int, state: Any | None) -> tuple[Tensor, Any]:
        """Prompt tokens [start, end) of one row appended to its state (None = first chunk); returns the last
        token's logits [1, V] and the row's state."""
        ...

    can_pack: bool  # whether `packed_step` may be called

    def packed_step(
        self, batch: Any | None, tokens: Tensor | None, chunks: Sequence[ChunkInput]
    ) -> tuple[Tensor | None, list[Tensor], list[Any]]:
        """ONE forward for the decode batch (`tokens` [B], None without decode rows) and `chunks`: the decode
        logits [B, V] (or None), each chunk's last-token logits [1, V] and each chunk row's state, exactly as
        `prefill_chunk` per chunk + `decode_step`. On an exception the caller rolls the states back."""
        ...

    def merge(self, states: Sequence[Any]) -> Any:
        """Join row states into one batch state (consumes them)."""
        ...

    def remove_rows(self, state: Any, rows: Sequence[int]) -> list[int]:
        """Drop `rows` of a batch state in place; returns the old index of each remaining row, in order."""
        ...

    def decode_step(self, state: Any, tokens: Tensor) -> Tensor:
        """One token per row ([B] long) -> next-token logits [B, V]; advances `state`."""
        ...

    def checkpoint(self, state: Any) -> Any:
        """What `rollback` needs to undo a decode step that raised (None when it cannot be undone)."""
        ...

    def rollback(self, state: Any, checkpoint: Any) -> None: ...

    def row_copy(self, state: Any, row: int) -> Any:
        """A one-row copy of `row` of a batch state (to retry it alone)."""
        ...


class LlavaOps:
    """`ModelOps` of `LlavaForConditionalGeneration` over the core's one implementation (`m2pt.forward`)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.can_pack = supports_packing(model)

    def compute_prefix(self, prompts: PromptTensors) -> BundlePrefix:
        return compute_prefix(self.model, prompts)

    def encode_images(
        self, pixels: Sequence[Tensor], prefixes: Sequence[BundlePrefix | None]
    ) -> list[Tensor]:
        batch = torch.stack(list(pixels)).to(self.device)  # [M, 3, H, W]
        return list(encode_images(self.model, batch, prefixes))  # M x [N, D]

    def prefill_chunk(
        self, row: RowInput, start: int, end: int, state: DecodeState | None
    ) -> tuple[Tensor, DecodeState]:
        return prefill_chunk(self.model, row, start, end, state)

    def packed_step(
        self, batch: DecodeState | None, tokens: Tensor | None, chunks: Sequence[ChunkInput]
    ) -> tuple[Tensor | None, list[Tensor], list[DecodeState]]:
        return packed_step(self.model, batch, None if tokens is None else tokens.to(self.device), chunks)

    def merge(self, states: Sequence[DecodeState]) -> DecodeState:
        """In place into the first state when the rows fit (one row copied each), else re-packed."""
        if len(states) > 1 and states[0].extend(states[1:]):
            return states[0]
        return DecodeState.merge(states)

    def remove_rows(self, state: DecodeState, rows: Sequence[int]) -> list[int]:
        return state.remove_rows(rows)

    def checkpoint(self, state: DecodeState) -> Any:
        return state.checkpoint()

    def rollback(self, state: DecodeState, checkpoint: Any) -> None:
        state.rollback(checkpoint)

    def row_copy(self, state: DecodeState, row: int) -> DecodeState:
        return state.row_copy(row)

    def decode_step(self, state: DecodeState, tokens: Tensor) -> Tensor:
        return decode_step(self.model, state, tokens.to(self.device))


class FamilyOps(LlavaOps):
    """`ModelOps` over an `m2pt.families` adapter (`frozen.family`): images, prefill, decode and prefixes go
    through the family; a family without `prefill_chunk` gets the core's LLaVA one (positions = prefix length +
    index, right for every Llama-style RoPE; M-RoPE families must provide their own)."""

    def __init__(self, family: Any, model: torch.nn.Module, device: torch.device) -> None:
        super().__init__(model, device)
        self.family = family
        # packing replaces the core's prefill_chunk + decode_step: only for families that use both
        self.can_pack = self.can_pack and getattr(family, "prefill_chunk", None) is None

    def compute_prefix(self, prompts: PromptTensors) -> BundlePrefix:
        return self.family.compute_prefix(self.model, prompts)

    def encode_images(self, pixels: Sequence[Any], prefixes: Sequence[BundlePrefix | None]) -> list[Tensor]:
        return list(self.family.encode_images(self.model, list(pixels), list(prefixes)))

    def prefill_chunk(self, row: RowInput, start: int, end: int, state: Any | None) -> tuple[Tensor, Any]:
        chunked = getattr(self.family, "prefill_chunk", None)
        if chunked is None:
            return super().prefill_chunk(row, start, end, state)
        return chunked(self.model, row, start, end, state)

    def decode_step(self, state: Any, tokens: Tensor) -> Tensor:
        return self.family.decode_step(self.model, state, tokens.to(self.device))


def ops_for(frozen: Any) -> ModelOps:
    """The model's `ModelOps`: its family's adapter when the loader attached one, else plain LLaVA."""
    family = getattr(frozen, "family", None)
    if family is not None:
        return FamilyOps(family, frozen.model, frozen.device)
    return LlavaOps(frozen.model, frozen.device)
