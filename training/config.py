"""Everything one training run is configured by, with M²PT's recipe as the defaults, and its validation.

Defaults follow the official recipe (research/paper.md §2): AdamW lr 7e-4, cosine schedule, 3 % warmup, no
weight decay, 3 epochs, 10 visual + 10 textual prompts per layer, Xavier-uniform prompt init, trainable
projector. `batch_size` is the *global* batch: under torchrun each of N processes takes 1/N of it, so the same
command gives the same optimisation whatever the process count. This module holds data only;
`training.trainer` runs it.

Each field's `metadata["help"]` is its documentation and the help of its `m2pt train` flag: `training.cli` builds
the parser from these fields (flag `--field-name` unless `flag` says otherwise; `group`, `action`, `choices`,
`required` and `exclusive` are the argparse details the type does not say).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from training.records import OnBad


class ConfigError(ValueError):
    """An inconsistent or out-of-range training option; the message names the flag."""


DATA, TRAINED, RECIPE, OUTPUT = (
    "data",
    "what is trained",
    "recipe (M²PT defaults)",
    "evaluation, checkpoints, output",
)


def option(default: Any, help: str, **cli: Any) -> Any:
    """A field with a default and its flag's documentation (`cli`: argparse details, see the module docstring)."""
    return field(default=default, metadata={"help": help, **cli})


def required(help: str) -> Any:
    """A field without a default: its flag is required."""
    return field(metadata={"help": help, "required": True})


@dataclass
class TrainConfig:
    base: str = required("frozen base of a supported family: local directory or HF id (e.g. demo/base)")
    data: str = required(
        "LLaVA-format JSON file, or a built-in dataset: digits, digits:test, synthetic:<task>[,<task>]"
    )
    out: str = required("bundle directory to write (missing, empty, or an older bundle)")
    name: str | None = option(None, "bundle name (default: the --out directory name)")
    version: str | None = option(None, "bundle version (default: assigned by the store)")
    eval_data: str | None = option(
        None, "held-out dataset (default: digits:test for digits, a fixed split of a JSON file)", group=DATA
    )
    image_folder: str | None = option(
        None, "folder that JSON image paths are relative to (default: the JSON's folder)", group=DATA
    )
    train_size: int | None = option(
        None, "cap on training records (synthetic: number drawn, default 2000)", group=DATA
    )
    eval_size: int | None = option(
        None, "cap on held-out records (synthetic: number drawn, default 200)", group=DATA
    )
    eval_fraction: float = option(0.1, "held-out share of a JSON file without --eval-data", group=DATA)
    on_bad_record: str = option(
        OnBad.FAIL.value,
        "what to do with a bad record (missing/unreadable image, no <image>, empty answer)",
        group=DATA,
        choices=tuple(m.value for m in OnBad),
    )
    visual_prompts: int = option(10, "visual prompt tokens per ViT layer (0: none)", group=TRAINED)
    text_prompts: int = option(10, "textual prompt tokens per LLM layer (0: none)", group=TRAINED)
    tune_projector: bool = option(
        True, "also train (a copy of) the vision-language projector, as M²PT does", group=TRAINED
    )
    steps: int | None = option(None, "optimiser steps (overrides --epochs)", group=RECIPE, exclusive="length")
    epochs: float = option(3.0, "passes over the training set", group=RECIPE, exclusive="length")
    batch_size: int = option(32, "global batch, split across torchrun processes", group=RECIPE)
    lr: float = option(7e-4, "peak learning rate of the prompts", group=RECIPE)
    projector_lr: float | None = option(
        None, "peak learning rate of the projector (default: --lr)", group=RECIPE
    )
    weight_decay: float = option(0.0, "AdamW weight decay of every trained tensor", group=RECIPE)
    warmup_ratio: float = option(0.03, "linear warmup share of the steps", group=RECIPE)
    max_grad_norm: float = option(1.0, "gradient clipping (0: off)", group=RECIPE)
    seed: int = option(0, "prompt init and data order", group=RECIPE)
    eval_every: int = option(100, "held-out evaluation every N steps (0: only at the end)", group=OUTPUT)
    eval_batch_size: int = option(64, "rows per held-out evaluation batch", group=OUTPUT)
    checkpoint_dir: str | None = option(
        None, "where checkpoints go (default: OUT.ckpt beside the bundle)", group=OUTPUT
    )
    checkpoint_every: int = option(200, "checkpoint every N steps (0: never)", group=OUTPUT)
    resume: bool = option(
        False, "continue from the latest checkpoint in --checkpoint-dir", group=OUTPUT, action="store_true"
    )
    publish_store: str | None = option(
        None,
        "also publish the bundle into this BundleStore root (e.g. ~/.local/share/m2pt/bundles, the user store "
        "m2pt serve reads; the shipped demo store is read-only)",
        group=OUTPUT,
    )
    push_url: str | None = option(
        None, "also upload the bundle to this server (needs $M2PT_OPS_TOKEN)", group=OUTPUT
    )
    device: str = option("auto", "auto, cpu, cuda (torchrun: cuda:LOCAL_RANK)", group=OUTPUT)
    dtype: str = option("auto", "auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16", group=OUTPUT)
    progress: bool = option(
        True,
        "progress bar while training (--no-progress: none)",
        group=OUTPUT,
        flag="--no-progress",
        action="store_false",
    )

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
