"""The M²PT trainer: frozen LLaVA base, trainable deep visual + textual prompts (+ projector), bundle export.

Contract of `train(cfg)`:
- The base is loaded frozen by `m2pt.loading`; only the `PromptModule` parameters get gradients and change.
- Every step runs the core's single prompt implementation (`compute_prefix` -> `encode_images` ->
  `prefill(all_logits=True)`) on a left-padded batch; the loss is the mean cross-entropy over the answer
  tokens of the global batch. AdamW with per-group learning rates (prompts, projector), linear warmup +
  cosine, grad clipping.
- Under torchrun (WORLD_SIZE > 1) the prompt module is wrapped in DDP (gloo on CPU, nccl on GPU); each rank
  takes a strided shard of the same global batch and rank 0 checkpoints and exports. One process or N give the
  same result up to floating-point reduction order.
- Held-out evaluation (greedy exact match through `prefill`/`decode_step`) runs at step 0, every `eval_every`
  steps and at the end. Checkpoints go to `cfg.checkpoint_path` every `checkpoint_every` steps; `resume`
  continues from the latest one and gives the same prompts as an uninterrupted run.
- Rank 0 exports the bundle (`training.export`), then optionally publishes and pushes it.
It does not parse command lines (`training.cli`) or compare variants (`training.demo.ablation`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from m2pt.loading import FrozenLlava, load_frozen_llava
from m2pt.prompts import PromptTensors, init_prompts
from training import export as exporter
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig
from training.data import DataOptions, collate, load_data
from training.distributed import DistContext
from training.evaluate import EvalResult, evaluate
from training.params import PromptModule, assert_frozen, count_parameters
from training.records import OnBad
from training.schedule import global_batch, lr_factor, shard, warmup_steps

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    prompts: PromptTensors  # final trained tensors (fp32, CPU)
    history: dict[str, Any]
    steps: int
    seconds: float  # training time of this invocation, evaluation excluded
    parameters: dict[str, int]
    final_accuracy: float | None
    bundle_dir: Path | None = None  # rank 0 only
    extra: dict[str, Any] = field(default_factory=dict)


def data_options(cfg: TrainConfig) -> DataOptions:
    return DataOptions(
        data=cfg.data,
        eval_data=cfg.eval_data,
        image_folder=cfg.image_folder,
        train_size=cfg.train_size,
        eval_size=cfg.eval_size,
        eval_fraction=cfg.eval_fraction,
        on_bad=OnBad(cfg.on_bad_record),
        seed=cfg.seed,
    )


def build_optimizer(module: PromptModule, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW, one group for the prompts and one for the projector (the schedule scales `base_lr`)."""
    groups = []
    if module.prompt_parameters():
        groups.append({"params": module.prompt_parameters(), "base_lr": cfg.lr, "name": "prompts"})
    if module.projector_parameters():
        plr = cfg.projector_lr or cfg.lr
        groups.append({"params": module.projector_parameters(), "base_lr": plr, "name": "projector"})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def load_base(cfg: TrainConfig, ctx: DistContext) -> FrozenLlava:
    try:
        return load_frozen_llava(cfg.base, device=ctx.device, dtype=cfg.dtype)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--base {cfg.base!r} could not be loaded as a LLaVA checkpoint: {exc}") from exc


class Trainer:
    """One training run; `run()` does the whole thing. Construct through `train()`."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, base: FrozenLlava | None):
        self.cfg, self.ctx = cfg, ctx
        torch.manual_seed(cfg.seed)
        self.base = base or load_base(cfg, ctx)
        assert_frozen(self.base.model)
        self.train_set, self.eval_set = load_data(
            data_options(cfg), self.base.processor, self.base.spec.image_size, self.base.family.split_images
        )
        if cfg.batch_size < ctx.world_size:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} is the global batch; it must be >= {ctx.world_size} processes"
            )
        base_projector = (
            self.base.family.projector(self.base.model).state_dict() if cfg.tune_projector else None
        )
        prompts = init_prompts(
            self.base.spec, cfg.text_prompts, cfg.visual_prompts, base_projector, seed=cfg.seed
        )
        self.module = PromptModule(prompts, self.base.model).to(self.base.device)
        self.wrapped: nn.Module = self.module
        if ctx.distributed:
            self.wrapped = nn.parallel.DistributedDataParallel(self.module)
        self.optimizer = build_optimizer(self.module, cfg)
        self.total = cfg.total_steps(len(self.train_set))
        self.warmup = warmup_steps(self.total, cfg.warmup_ratio)
        self.history: dict[str, Any] = {"loss": [], "eval": [], "lr": []}
        self.start_step = 0
        self.seconds = 0.0
        if cfg.resume:
            self.resume()

    # ------------------------------------------------------------------ state
    def resume(self) -> None:
        ckpt = load_checkpoint(self.cfg.checkpoint_path, self.module, self.optimizer)
        mismatches = self.cfg.resume_mismatches(ckpt.config)
        if mismatches:
            raise ConfigError(
                "--resume: the checkpoint was made with different options: " + "; ".join(mismatches)
            )
        self.start_step, self.history = ckpt.step, ckpt.history
        self.seconds = float(ckpt.history.get("seconds", 0.0))

    def checkpoint(self, step: int) -> None:
        if self.ctx.is_main:
            self.history["seconds"] = self.seconds
            save_checkpoint(
                self.cfg.checkpoint_path, step, self.module, self.optimizer, self.cfg.to_json(), self.history
            )
        self.ctx.barrier()

    # ------------------------------------------------------------------ steps
    def train_step(self, step: int) -> float:
        """One optimiser step on the global batch of `step`; returns its mean answer-token loss."""
        factor = lr_factor(step, self.total, self.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        indices = global_batch(step, self.cfg.batch_size, len(self.train_set), self.cfg.seed)
        mine = shard(indices, self.ctx.rank, self.ctx.world_size)
        batch = collate([self.train_set.examples[i] for i in mine])
        loss = self.wrapped(batch, self.train_set.target_count(indices))  # local share of the global mean
        (loss * self.ctx.world_size).backward()  # DDP averages gradients over ranks; undo the 1/N
        if self.cfg.max_grad_norm:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.ctx.all_sum([loss.item()])[0]

    def evaluate(self, step: int) -> EvalResult:
        """Held-out greedy exact match of the current prompts (summed over ranks), recorded at `step`."""
        res = evaluate(
            self.base.model,
            self.eval_set,
            self.module.prompts(),
            self.cfg.eval_batch_size,
            self.ctx.rank,
            self.ctx.world_size,
            decode=self.base.processor.tokenizer.decode,
        )
        correct, total = self.ctx.all_sum([res.correct, res.total])
        result = EvalResult(int(correct), int(total), res.samples)
        self.history["eval"].append([step, result.accuracy])
        log.info(
            "step %d: held-out exact match %.1f%% (%d/%d); e.g. %s",
            step,
            100 * result.accuracy,
            result.correct,
            result.total,
            result.samples[:3],
        )
        return result

    def due(self, every: int, step: int) -> bool:
        return bool(every) and step % every == 0 and step < self.total

    def loop(self) -> None:
        from tqdm import tqdm

        bar = tqdm(
            total=self.total,
            initial=self.start_step,
            desc=f"m2pt train {self.cfg.bundle_name}",
            unit="step",
            disable=not (self.ctx.is_main and self.cfg.progress),
            dynamic_ncols=True,
        )
        with bar:
            for step in range(self.start_step, self.total):
                began = time.perf_counter()
                loss = self.train_step(step)
                spent = time.perf_counter() - began
                self.seconds += spent
                self.history["loss"].append([step + 1, loss])
                self.history["lr"].append([step + 1, self.optimizer.param_groups[0]["lr"]])
                bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{self.cfg.batch_size / max(spent, 1e-9):.0f}")
                bar.update(1)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {step + 1}; lower --lr")
                if self.eval_set.examples and self.due(self.cfg.eval_every, step + 1):
                    self.evaluate(step + 1)
                if self.due(self.cfg.checkpoint_every, step + 1):
                    self.checkpoint(step + 1)

    # ------------------------------------------------------------------ whole run
    def run(self) -> TrainResult:
        cfg = self.cfg
        params = count_parameters(self.module)
        log.info(
            "training %s: %d steps of %d (global batch), %d warmup; trainable %s; %d train / %d eval",
            cfg.bundle_name,
            self.total,
            cfg.batch_size,
            self.warmup,
            params,
            len(self.train_set),
            len(self.eval_set),
        )
        if self.eval_set.examples and cfg.eval_every and self.start_step == 0:
            self.evaluate(0)
        self.loop()
        final = self.evaluate(self.total) if self.eval_set.examples else None
        if cfg.checkpoint_every:
            self.checkpoint(self.total)
        result = TrainResult(
            self.module.export(),
            self.history,
            self.total,
            self.seconds,
            params,
            None if final is None else final.accuracy,
        )
        if self.ctx.is_main:
            result.bundle_dir = self.export(result)
        self.ctx.barrier()
        return result

    def provenance(self, result: TrainResult) -> dict[str, Any]:
        losses = [v for _, v in self.history["loss"]]
        return {
            "trainer": "m2pt-serve training (M²PT: deep visual + deep textual prompts"
            + (" + projector)" if self.cfg.tune_projector else ")"),
            "dataset": {
                "train": self.cfg.data,
                "train_examples": len(self.train_set),
                "eval": self.eval_set.name,
                "eval_examples": len(self.eval_set),
                "bad_records_skipped": len(self.train_set.bad),
            },
            "steps": result.steps,
            "seconds": round(result.seconds, 2),
            "world_size": self.ctx.world_size,
            "parameters": result.parameters,
            "metrics": {
                "eval_exact_match": result.final_accuracy,
                "final_loss": losses[-1] if losses else None,
                "eval_curve": self.history["eval"],
            },
            "config": self.cfg.to_json(),
        }

    def export(self, result: TrainResult) -> Path:
        cfg = self.cfg
        bundle_dir = exporter.export_bundle(
            cfg.out,
            result.prompts,
            self.base.spec,
            cfg.bundle_name,
            cfg.version,
            self.provenance(result),
            self.history,
        )
        if cfg.publish_store:
            result.extra["published"] = str(
                exporter.publish(bundle_dir, cfg.publish_store, cfg.bundle_name, cfg.version)
            )
        if cfg.push_url:
            result.extra["pushed"] = exporter.push(bundle_dir, cfg.push_url)
        return bundle_dir


def train(cfg: TrainConfig, ctx: DistContext | None = None, base: FrozenLlava | None = None) -> TrainResult:
    """Run one training. `ctx` defaults to the torchrun environment; `base` reuses a loaded model."""
    cfg.validate()
    exporter.check_outputs(cfg.out, cfg.publish_store, cfg.push_url)
    own = ctx is None
    ctx = ctx or DistContext.from_env(cfg.device)
    try:
        return Trainer(cfg, ctx, base).run()
    finally:
        if own:
            ctx.close()
