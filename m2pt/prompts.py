"""The learned parameters of one M²PT task: deep visual prompts, deep textual prompts and an optional projector.

`PromptTensors` is the in-memory form shared by training (as `nn.Parameter`s) and serving (as frozen tensors).
Its flat form (`to_flat` / `from_flat`) is exactly what a bundle's safetensors file holds. This module knows
nothing about files or manifests; `prompts_store` does the I/O and validation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from m2pt.spec import ModelSpec

TEXT_KEY = "text_prompts"  # [llm_layers, Lt, llm_dim]
VISUAL_KEY = "visual_prompts"  # [vit_layers, Lv, vit_dim]
PROJECTOR_PREFIX = "projector."  # + multi_modal_projector.state_dict() key, e.g. "projector.linear_1.weight"


@dataclass
class PromptTensors:
    """One task's prompts. Any part may be absent (a text-only or visual-only variant, or no projector)."""

    text: Tensor | None = None  # [llm_layers, Lt, llm_dim]
    visual: Tensor | None = None  # [vit_layers, Lv, vit_dim]
    projector: dict[str, Tensor] | None = None  # multi_modal_projector state dict

    @property
    def text_len(self) -> int:
        return 0 if self.text is None else int(self.text.shape[1])

    @property
    def visual_len(self) -> int:
        return 0 if self.visual is None else int(self.visual.shape[1])

    def to_flat(self) -> dict[str, Tensor]:
        """Flat name → tensor map, as stored in a bundle (contiguous CPU tensors)."""
        flat: dict[str, Tensor] = {}
        if self.text is not None:
            flat[TEXT_KEY] = self.text
        if self.visual is not None:
            flat[VISUAL_KEY] = self.visual
        for name, tensor in (self.projector or {}).items():
            flat[PROJECTOR_PREFIX + name] = tensor
        return {k: v.detach().to("cpu").contiguous() for k, v in flat.items()}

    @classmethod
    def from_flat(cls, flat: dict[str, Tensor]) -> PromptTensors:
        projector = {k[len(PROJECTOR_PREFIX) :]: v for k, v in flat.items() if k.startswith(PROJECTOR_PREFIX)}
        return cls(text=flat.get(TEXT_KEY), visual=flat.get(VISUAL_KEY), projector=projector or None)

    def parameters(self) -> list[Tensor]:
        """Every tensor, in a fixed order (text, visual, projector by name)."""
        out = [t for t in (self.text, self.visual) if t is not None]
        projector = self.projector or {}
        out += [projector[k] for k in sorted(projector)]
        return out

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.parameters())


def expected_shapes(
    spec: ModelSpec, text_len: int, visual_len: int, projector: bool
) -> dict[str, tuple[int, ...]]:
    """The flat tensor names and shapes a bundle for `spec` must have."""
    shapes: dict[str, tuple[int, ...]] = {}
    if text_len:
        shapes[TEXT_KEY] = spec.text_prompt_shape(text_len)
    if visual_len:
        shapes[VISUAL_KEY] = spec.visual_prompt_shape(visual_len)
    if projector:
        shapes.update({PROJECTOR_PREFIX + k: v for k, v in spec.projector_shapes.items()})
    return shapes


def xavier_prompts(layers: int, length: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
    """Xavier-uniform prompts as the official code makes them.

    Each layer's `[1, L, d]` gets U(±sqrt(6 / (d (L + 1)))).
    """
    bound = (6.0 / (dim * (length + 1))) ** 0.5
    return (torch.rand(layers, length, dim, generator=generator) * 2 - 1) * bound  # [layers, L, d]


def init_prompts(
    spec: ModelSpec,
    text_len: int,
    visual_len: int,
    base_projector: dict[str, Tensor] | None = None,
    seed: int = 0,
) -> PromptTensors:
    """Fresh trainable prompts (fp32, CPU).

    `base_projector` (the frozen model's projector weights) seeds a tuned copy.
    """
    gen = torch.Generator().manual_seed(seed)
    text = xavier_prompts(spec.llm_layers, text_len, spec.llm_dim, gen) if text_len else None
    visual = xavier_prompts(spec.vit_layers, visual_len, spec.vit_dim, gen) if visual_len else None
    projector = None
    if base_projector is not None:
        projector = {k: v.detach().to("cpu", torch.float32).clone() for k, v in base_projector.items()}
    return PromptTensors(text=text, visual=visual, projector=projector)
