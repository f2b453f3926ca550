"""What `m2pt train` says when it is stopped with Ctrl-C: one line, with the `--resume` hint when a checkpoint
exists, instead of a traceback. `interrupted_message(cfg)` builds that line; it reads only the checkpoint
pointer (`latest.json`), never the tensors."""

from __future__ import annotations

import json
from pathlib import Path

from training.checkpoint import LATEST
from training.config import TrainConfig


def latest_checkpoint_step(checkpoint_dir: Path) -> int | None:
    """The newest checkpoint's step in `checkpoint_dir`, or None when there is none or it is unreadable."""
    try:
        return int(json.loads((checkpoint_dir / LATEST).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def interrupted_message(cfg: TrainConfig) -> str:
    """One line for an interrupted run: where to resume from, or that nothing was checkpointed yet."""
    ckpt = cfg.checkpoint_path
    step = latest_checkpoint_step(ckpt)
    if step is None:
        return (
            f"m2pt train: interrupted before the first checkpoint (one is written every "
            f"{cfg.checkpoint_every} steps, --checkpoint-every); rerun the same command to start again"
        )
    return (
        f"m2pt train: interrupted; the last checkpoint (step {step}) is in {ckpt}: rerun the same command "
        "with --resume to continue from it"
    )
