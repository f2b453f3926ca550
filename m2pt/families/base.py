"""The per-family adapter interface.

A *family* is one way of wiring a vision tower, a projector and an LLM (plain LLaVA, LLaVA-NeXT, Qwen2.5-VL,
...).
Everything the core does that depends on that wiring goes through a `ModelFamily`:

1. before weights load: `check_config` refuses configs the family cannot serve (the startup gate);
2. loading: `model_class` is the HF class; `check_modules` verifies the module shapes the prompt math relies
on;
   `prepare` installs what the forward needs (e.g. prefix-aware attention);
3. bundles: `spec_from_model` describes the base (`ModelSpec`, whose fingerprint decides bundle
compatibility);
   `projector` is the module whose `state_dict()` a bundle may replace; `compute_prefix` turns `PromptTensors`
   into the per-layer K/V the forward consumes (differentiable);
4. images: `split_images` cuts a processor's output into one `ImageInput` per image (so features can be
   cached per image); `encode_images` runs the tower under each image's bundle and returns each image's projected
   features `[N_i, D]` (N_i may differ per image);
5. text: `prefill` / `decode_step` run a batch of `RowInput`s whose rows each carry their own bundle or none.

Families hold no per-model state (a model's state lives on the model); one instance serves every model of the
family. Contract of every family: a row without a bundle computes what the unmodified HF model computes; rows
of a mixed batch compute what each computes alone; prompts and projector are the only things gradients reach.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from m2pt.forward import DecodeState, RowInput
    from m2pt.prefix import BundlePrefix
    from m2pt.prompts import PromptTensors
    from m2pt.spec import ModelSpec


class UnsupportedModelError(ValueError):
    """The checkpoint is not one the core implements; the message says what it is and what is supported."""


@dataclass(frozen=True)
class ImageInput:
    """One image as the family's processor prepared it.

    `pixel_values` is in the family's own layout: LLaVA `[3, H, W]`; any-res families `[tiles, 3, H, W]`;
    patch-packing families (Qwen-VL) `[patches, C*t*p*p]`. `extras` holds the per-image tensors the family
    needs besides pixels (e.g. `image_sizes` `[2]`, `image_grid_thw` `[3]`), keyed by the processor's own names.
    """

    pixel_values: Tensor
    extras: Mapping[str, Tensor] = field(default_factory=dict)


class ModelFamily(ABC):
    """One model family's implementation of the core (see the module docstring for the contract)."""

    name: str = ""  # short id, e.g. "llava"
    architectures: tuple[str, ...] = ()  # HF `config.architectures` names this family serves

    @abstractmethod
    def model_class(self) -> type[PreTrainedModel]:
        """The HF class to load the checkpoint with (imported lazily)."""

    @abstractmethod
    def check_config(self, config: Any, model_id: str) -> None:
        """Raise `UnsupportedModelError` for a config this family cannot serve (before any weight is read)."""

    @abstractmethod
    def check_modules(self, model: nn.Module, model_id: str) -> None:
        """Raise `UnsupportedModelError` unless the loaded modules have the shapes the prompt math relies
        on."""

    def prepare(self, model: nn.Module) -> None:  # noqa: B027 (optional hook)
        """Install what the forward needs on a freshly loaded, frozen model (idempotent). Default: nothing."""

    @abstractmethod
    def spec_from_model(self, model: nn.Module, model_id: str) -> ModelSpec:
        """The base's `ModelSpec` (works on a meta-device skeleton: reads shapes, never values)."""

    @abstractmethod
    def projector(self, model: nn.Module) -> nn.Module:
        """The module a bundle's projector tensors replace (`state_dict()` keys = bundle `projector.*`
        names)."""

    @abstractmethod
    def compute_prefix(self, model: nn.Module, prompts: PromptTensors) -> BundlePrefix:
        """Per-layer K/V of `prompts` on the model's device and dtype; differentiable w.r.t. the prompts."""

    @abstractmethod
    def split_images(self, encoded: Mapping[str, Any]) -> list[ImageInput]:
        """One `ImageInput` per image of a processor output (`processor(images=..., text=...)`), in order."""

    @abstractmethod
    def encode_images(
        self, model: nn.Module, images: Sequence[ImageInput], prefixes: Sequence[BundlePrefix | None]
    ) -> list[Tensor]:
        """Projected features of each image under its bundle (`prefixes[i]` is image i's): each `[N_i, D]`."""

    @abstractmethod
    def prefill(
        self, model: nn.Module, rows: Sequence[RowInput], all_logits: bool = False
    ) -> tuple[Tensor, DecodeState]:
        """Run every row's prompt; logits `[B, V]` (or `[B, T, V]` left-padded) and the state to decode
        from."""

    @abstractmethod
    def decode_step(self, model: nn.Module, state: DecodeState, tokens: Tensor) -> Tensor:
        """Feed one token per row (`[B]` long); next-token logits `[B, V]`; advances `state` in place."""

    def prefill_spans(self, model: nn.Module, input_ids: Tensor) -> list[tuple[int, int]]:
        """Token ranges `[start, end)` of a prompt (`input_ids` [T]) that chunked prefill must feed in one chunk
        (sorted, disjoint). Default: none, any boundary is valid. Gemma 3: each image's run of placeholder
        tokens (they attend to each other both ways). The serving scheduler never cuts inside one."""
        return []

    def chunk_end(self, model: nn.Module, row: RowInput, end: int) -> int:
        """The first valid chunk boundary at or after `end` for chunked prefill (default: any boundary is
        valid; families with bidirectional spans, e.g. Gemma 3's images, move it past the span)."""
        return end

    def smoke_text(self, processor: Any) -> str:
        """The text of the startup smoke prefill: one image placeholder (the processor expands it)."""
        return str(processor.image_token)

    def load_processor(self, name_or_path: str) -> Any:
        """The checkpoint's processor (image processor + tokenizer); must work without torchvision."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(name_or_path)
