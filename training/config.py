"""Everything one training run is configured by, with M²PT's recipe as the defaults, and its validation.

Defaults follow the official recipe (research/paper.md §2): AdamW lr 7e-4, cosine schedule, 3 % warmup, no
weight decay, 3 epochs, 10 visual + 10 textual prompts per layer, Xavier-uniform prompt init, trainable
projector. `batch_size` is the *global* batch: under torchrun each of N processes takes 1/N of it, so the same
command gives the same optimisation whatever the process count. This module holds data only;
`training.trainer` runs it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from training.records import OnBad


class ConfigError(ValueError):
    """An inconsistent or out-of-range training option; the message names the flag."""


@dataclass
class TrainConfig:
    base: str
    data: str
    out: str
    name: str | None = None
    version: str | None = None
    # data
    eval_data: str | None = None
    image_folder: str | None = None
    train_size: int | None = None
    eval_size: int | None = None
    eval_fraction: float = 0.1
    on_bad_record: str = OnBad.FAIL.value
    # what is trained
    visual_prompts: int = 10
    text_prompts: int = 10
    tune_projector: bool = True
    # recipe
    steps: int | None = None
    epochs: float = 3.0
    batch_size: int = 32
    lr: float = 7e-4
    projector_lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    seed: int = 0
    # evaluation, checkpoints, output
    eval_every: int = 100
    eval_batch_size: int = 64
    checkpoint_dir: str | None = None
    checkpoint_every: int = 200
    resume: bool = False
    publish_store: str | None = None
    push_url: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True

    def validate(self) -> TrainConfig:
        """Raise `ConfigError` for a bad combination; returns self."""
        positive = {"batch_size": self.batch_size, "lr": self.lr, "eval_batch_size": self.eval_batch_size}
        for flag, value in positive.items():
            if not value > 0:
                raise ConfigError(f"--{flag.replace('_', '-')} must be positive, got {value}")
        non_negative = {
            "visual_prompts": self.visual_prompts,
            "text_prompts": self.text_prompts,
            "eval_every": self.eval_every,
            "checkpoint_every": self.checkpoint_every,
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
        }
        for flag, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {value}")
        if self.steps is not None and self.steps <= 0:
            raise ConfigError(f"--steps must be positive, got {self.steps}")
        if self.steps is None and not self.epochs > 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.projector_lr is not None and not self.projector_lr > 0:
            raise ConfigError(f"--projector-lr must be positive, got {self.projector_lr}")
        if not (self.visual_prompts or self.text_prompts or self.tune_projector):
            raise ConfigError(
                "nothing to train: set --visual-prompts or --text-prompts > 0, or --tune-projector"
            )
        if self.on_bad_record not in {m.value for m in OnBad}:
            raise ConfigError(f"--on-bad-record must be skip or fail, got {self.on_bad_record!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        return self

    @property
    def bundle_name(self) -> str:
        return self.name or Path(self.out).name

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(str(Path(self.out)) + ".ckpt")

    def total_steps(self, train_examples: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.epochs * train_examples / self.batch_size))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    # Fields that must match for a checkpoint to be resumed (eval cadence, outputs etc. may change).
    RESUME_KEYS = (
        "base",
        "data",
        "train_size",
        "visual_prompts",
        "text_prompts",
        "tune_projector",
        "batch_size",
        "lr",
        "projector_lr",
        "weight_decay",
        "warmup_ratio",
        "max_grad_norm",
        "seed",
        "steps",
        "epochs",
    )

    def resume_mismatches(self, saved: dict[str, Any]) -> list[str]:
        return [
            f"{k}: checkpoint {saved.get(k)!r} vs now {getattr(self, k)!r}"
            for k in self.RESUME_KEYS
            if saved.get(k) != getattr(self, k)
        ]

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
