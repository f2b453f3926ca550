"""Load a Hugging Face checkpoint frozen, on a chosen device and dtype, through the startup gate, and describe
it as a `ModelSpec`.

The gate (`load_frozen_llava`), in order, each step refusing with `UnsupportedModelError` and a message that
says what is supported:
1. read the config only and pick the family (`m2pt.families.registry.family_for_config`): unknown
   architectures, towers and LLMs are refused before any weight is read;
2. load the weights with loading info and refuse missing, unexpected or mismatched keys (a randomly
   initialised projector must never be served);
3. check the module shapes the prompt math relies on (`family.check_modules`);
4. run a one-row smoke prefill with a blank image through the family's own forward
   (`m2pt.gate.smoke_prefill`).
Loading is the only place that touches the hub or disk; nothing here runs at import time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from m2pt.families.base import ModelFamily, UnsupportedModelError
from m2pt.families.llava import LLAVA
from m2pt.families.registry import family_for_config, family_of, supported_summary
from m2pt.spec import ModelSpec

__all__ = [
    "UnsupportedModelError",
    "FrozenLlava",
    "load_frozen_llava",
    "spec_from_model",
    "spec_from_checkpoint",
]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU. An explicit `cuda` without a GPU raises with a clear
    message."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device} asked for, but torch sees no CUDA device; use --device cpu or auto"
        )
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA (float16 where bf16 is unsupported) and float32 on CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


@dataclass
class FrozenLlava:
    """A loaded base: the HF model (eval mode, no grads), its processor, its spec and its family adapter."""

    model: nn.Module  # e.g. LlavaForConditionalGeneration
    processor: Any  # e.g. LlavaProcessor
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    family: ModelFamily = LLAVA


def freeze(model: nn.Module) -> nn.Module:
    """Put `model` in eval mode with every parameter frozen; returns it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def spec_from_model(model: nn.Module, model_id: str) -> ModelSpec:
    """Read a `ModelSpec` off a loaded model of a supported family."""
    return family_of(model).spec_from_model(model, model_id)


def gate_config(name_or_path: str) -> tuple[Any, ModelFamily]:
    """Step 1 of the gate: the checkpoint's config and its family, or `UnsupportedModelError`."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (
        KeyError,
        ValueError,
    ) as exc:  # an unknown model_type or an unreadable config (OSError: no such path)
        raise UnsupportedModelError(
            f"{name_or_path}: not a model config transformers can read ({exc}); {supported_summary()}"
        ) from exc
    return config, family_for_config(config, str(name_or_path))


def spec_from_checkpoint(name_or_path: str) -> ModelSpec:
    """The `ModelSpec` of a checkpoint from its config alone (a meta-device skeleton; no weights are read),
    through the same config and module checks as loading."""
    config, family = gate_config(name_or_path)
    with torch.device("meta"):
        skeleton = family.model_class()(config)
    family.check_modules(skeleton, str(name_or_path))
    return family.spec_from_model(skeleton, str(name_or_path))


def check_loading_info(info: dict[str, Any], model_id: str) -> None:
    """Step 2 of the gate: every weight the model has came from the checkpoint, and nothing was left over."""
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        names = sorted(str(k) for k in info.get(key) or [])
        if names:
            shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
            problems.append(f"{key.replace('_', ' ')}: {shown}")
    if problems:
        raise UnsupportedModelError(
            f"{model_id}: the checkpoint's weights do not match its architecture ({'; '.join(problems)}); "
            "refusing to serve a partly random model"
        )


def load_frozen_llava(
    name_or_path: str, device: str = "auto", dtype: str = "auto", smoke: bool = True
) -> FrozenLlava:
    """Load model + processor from a local directory or hub id through the gate (module docstring), frozen, on
    `device` in `dtype`. `smoke=False` skips step 4 (only for callers that run their own forward at once)."""
    from m2pt.gate import smoke_prefill
    from m2pt.preflight import check_model_source, check_transformers_version

    check_transformers_version()
    check_model_source(name_or_path)
    model_id = str(name_or_path)
    config, family = gate_config(name_or_path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    log.info("loading %s (%s family) on %s as %s", model_id, family.name, dev, dt)
    loaded: Any = family.model_class().from_pretrained(
        name_or_path, config=config, dtype=dt, attn_implementation="sdpa", output_loading_info=True
    )
    model: nn.Module = loaded[0]
    check_loading_info(loaded[1], model_id)  # {"missing_keys": ..., "unexpected_keys": ..., ...}
    family.check_modules(model, model_id)
    model = freeze(model.to(dev))
    processor = family.load_processor(name_or_path)
    family.prepare(model)
    frozen = FrozenLlava(model, processor, family.spec_from_model(model, model_id), dev, dt, family)
    if smoke:
        smoke_prefill(frozen)
    return frozen
