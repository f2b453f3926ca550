"""Typed access to the parts of a Hugging Face model that the prompt math reads.

torch types every `nn.Module` attribute lookup as `Tensor | Module`, and transformers' model classes do not declare
their submodules, so `model.model.vision_tower.encoder.layers` has no static type. These accessors name a part by
its dotted path, which is also its parameter prefix in the checkpoint ("model.vision_tower.encoder.layers"), check
at run time that it is what the caller needs, and return it typed. They hold no state and do no I/O.

Config values go through `config(model)`: a transformers `PretrainedConfig`, whose fields differ per architecture,
so it is returned as `Any`; read its fields into typed locals (`int(cfg.hidden_size)`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def part(root: nn.Module, path: str) -> nn.Module:
    """The submodule of `root` at dotted `path`; AttributeError naming the missing piece if there is none."""
    return root.get_submodule(path)


def layers(root: nn.Module, path: str) -> nn.ModuleList:
    """The `nn.ModuleList` at dotted `path` (e.g. a tower's or an LLM's stack of layers)."""
    found = root.get_submodule(path)
    if not isinstance(found, nn.ModuleList):
        raise TypeError(f"{type(root).__name__}.{path} is a {type(found).__name__}, not a ModuleList")
    return found


def has_part(root: nn.Module, path: str) -> bool:
    """Whether `root` has a submodule at dotted `path`."""
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def int_attr(module: nn.Module, name: str) -> int:
    """A plain integer attribute of a module (e.g. an attention module's `head_dim`)."""
    value = getattr(module, name)
    if not isinstance(value, int):
        raise TypeError(f"{type(module).__name__}.{name} is {value!r}, not an int")
    return value


def input_embeddings(model: nn.Module) -> nn.Module:
    """The token embedding of a transformers model (`PreTrainedModel.get_input_embeddings()`)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{type(model).__name__} is not a transformers PreTrainedModel")
    return model.get_input_embeddings()


def config(model: nn.Module) -> Any:
    """`model.config`, the transformers `PretrainedConfig` (its fields are per-architecture, hence `Any`)."""
    cfg: Any = model.config
    return cfg


def param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of `module`'s first parameter (what HF's `PreTrainedModel.dtype` reports)."""
    return next(module.parameters()).dtype
