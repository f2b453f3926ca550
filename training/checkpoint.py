"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

Layout of a checkpoint directory:
    latest.json                      {"step": N, "dir": "step-0000000N"}, replaced atomically once the
                                     step directory is complete
    step-0000000N/state.safetensors  "param.<name>" trainable tensors, "optim.<i>.<key>" optimiser
                                     moments, "rng.torch"
    step-0000000N/state.json          step, config, history, optimiser scalars + param groups

The learning-rate schedule and the data order are pure functions of the step (`training.schedule`), so the
step number restores both. Only rank 0 writes; every rank reads. This module does not decide *when* to
checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

FORMAT = "m2pt-train-checkpoint/1"
LATEST = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit this run."""


@dataclass
class Checkpoint:
    step: int
    config: dict[str, Any]
    history: dict[str, Any]


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW `state_dict()` -> (tensors for safetensors, JSON-able scalars and param groups)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            elif isinstance(value, torch.Tensor):
                scalars.setdefault(str(idx), {})[key] = {
                    "tensor": value.item(),
                    "dtype": str(value.dtype).split(".")[-1],
                }
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]
    ]
    return tensors, {"scalars": scalars, "param_groups": groups}


def join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `split_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        for key, value in entry.items():
            if isinstance(value, dict) and "tensor" in value:
                value = torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
            state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    directory: str | Path,
    step: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    history: dict[str, Any],
) -> Path:
    """Write the checkpoint of `step` and point `latest.json` at it; older step directories are removed."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    optim_tensors, optim_meta = split_optimizer_state(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {"format": FORMAT, "step": step, "config": config, "history": history, "optimizer": optim_meta}
    _write_json(tmp / "state.json", meta)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_json(root / LATEST, {"step": step, "dir": name})
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint: step %d -> %s", step, final)
    return final


def load_checkpoint(directory: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """Restore `module`, `optimizer` and the torch RNG from the latest checkpoint in `directory`."""
    root = Path(directory)
    pointer = root / LATEST
    if not pointer.is_file():
        raise CheckpointError(
            f"no checkpoint to resume in {root} (no {LATEST}); drop --resume to start fresh"
        )
    try:
        latest = json.loads(pointer.read_text())
        step_dir = root / latest["dir"]
        meta = json.loads((step_dir / "state.json").read_text())
        tensors = load_file(str(step_dir / "state.safetensors"))
    except (OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint in {root} is unreadable or incomplete: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{step_dir}: unknown checkpoint format {meta.get('format')!r}, expected {FORMAT}"
        )
    params = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    try:
        module.load_state_dict(params, strict=True)
        optimizer.load_state_dict(join_optimizer_state(tensors, meta["optimizer"]))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{step_dir} does not fit this run's prompts/optimiser: {exc}") from exc
    torch.set_rng_state(tensors["rng.torch"])
    log.info("resumed from %s (step %d)", step_dir, meta["step"])
    return Checkpoint(step=int(meta["step"]), config=meta["config"], history=meta["history"])
