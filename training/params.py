"""The trainable side of M²PT as an `nn.Module`, so DDP can synchronise its gradients, and the training
forward.

`PromptModule` holds one task's `PromptTensors` as fp32 `nn.Parameter`s (text prompts, visual prompts,
projector weights) and a non-registered reference to the frozen base. Its `forward(batch)` runs the core's
single implementation of the prompt math, through the base's family adapter (`m2pt.families`):
`compute_prefix` -> `encode_images` -> `prefill(all_logits=True)`, and returns the answer-token cross-entropy.
The frozen model is not a submodule: DDP neither broadcasts nor
reduces it, and `state_dict()` holds the trainable tensors only.

It does not own the optimiser, data order or I/O (see `training.trainer`, `training.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from m2pt.families.base import ImageInput, ModelFamily
from m2pt.families.registry import family_of
from m2pt.forward import RowInput
from m2pt.prefix import BundlePrefix
from m2pt.prompts import PromptTensors
from training.data import IGNORE_INDEX, Batch

TEXT_PARAM = "text"
VISUAL_PARAM = "visual"
PROJECTOR_SEP = "__"  # parameter names may not contain "."; "linear_1.weight" is stored as "linear_1__weight"


class PromptModule(nn.Module):
    """Trainable prompts + projector around a frozen LLaVA (kept outside the module tree)."""

    def __init__(self, prompts: PromptTensors, frozen_model: nn.Module):
        super().__init__()
        object.__setattr__(self, "frozen", frozen_model)
        self.text = None if prompts.text is None else nn.Parameter(prompts.text.detach().float().clone())
        self.visual = (
            None if prompts.visual is None else nn.Parameter(prompts.visual.detach().float().clone())
        )
        self.projector = nn.ParameterDict(
            {
                k.replace(".", PROJECTOR_SEP): nn.Parameter(v.detach().float().clone())
                for k, v in (prompts.projector or {}).items()
            }
        )

    def prompts(self) -> PromptTensors:
        """The live parameters as `PromptTensors` (gradients flow through it)."""
        projector = {k.replace(PROJECTOR_SEP, "."): v for k, v in self.projector.items()} or None
        return PromptTensors(text=self.text, visual=self.visual, projector=projector)

    def export(self) -> PromptTensors:
        """Detached fp32 CPU copies, ready for `save_bundle`."""
        live = self.prompts()
        return PromptTensors.from_flat(live.to_flat())

    def projector_parameters(self) -> list[nn.Parameter]:
        return list(self.projector.values())

    def prompt_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.text, self.visual) if p is not None]

    def logits(self, batch: Batch) -> Tensor:
        """Left-padded logits [B, T, V] of the whole batch under the current prompts."""
        model = self.frozen
        family = family_of(model)
        prefix = family.compute_prefix(model, self.prompts())
        images = batch.images or [(ImageInput(px),) for px in batch.pixel_values]  # per example
        rows = family_rows(family, model, batch.input_ids, images, prefix)
        logits, _ = family.prefill(model, rows, all_logits=True)  # [B, T, V]
        return logits

    def forward(self, batch: Batch, global_tokens: int) -> Tensor:
        """Sum of this shard's answer-token losses divided by `global_tokens`, the answer-token count of the
        whole global batch. Summed over ranks this is the global mean; DDP averages gradients, so callers
        multiply by the world size before `backward()`."""
        logits = self.logits(batch)
        labels = batch.labels.to(logits.device)
        token_loss = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),  # [B*(T-1), V]
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return token_loss / max(global_tokens, 1)


def family_rows(
    family: ModelFamily,
    model: nn.Module,
    input_ids: Sequence[Tensor],
    images: Sequence[Sequence[ImageInput]],
    prefix: BundlePrefix | None,
) -> list[RowInput]:
    """`RowInput`s of examples that all use `prefix`: every image goes through one `encode_images` call."""
    flat = [im for row in images for im in row]
    features = iter(family.encode_images(model, flat, [prefix] * len(flat)))
    rows = []
    for ids, row_images in zip(input_ids, images, strict=True):
        feats = [next(features) for _ in row_images]
        rows.append(RowInput(ids, torch.cat(feats) if feats else None, prefix, tuple(row_images)))
    return rows


def count_parameters(module: PromptModule) -> dict[str, int]:
    """Trainable parameter counts by part."""
    return {
        "text": 0 if module.text is None else module.text.numel(),
        "visual": 0 if module.visual is None else module.visual.numel(),
        "projector": sum(p.numel() for p in module.projector.values()),
    }


def assert_frozen(model: nn.Module) -> None:
    """The base must have no trainable parameter; training would silently update it otherwise."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise RuntimeError(
            f"the base model has trainable parameters ({trainable[:3]}...); load it with m2pt.loading"
        )
