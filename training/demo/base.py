"""Pretrain the shipped demo base model (demo/base) from scratch on synthetic data, and evaluate it.

Contract:
- `m2pt demo train --out DIR [--steps N] [--seconds S] [--seed S]` builds a tiny LLaVA (`training.tiny`) with
  the demo vocabulary (`training.demo.synthetic.vocabulary()`), fully fine-tunes it on the mixed pretraining tasks
  with the recipe in `DemoRecipe` (loss on answer tokens only), then writes a loadable checkpoint,
  `metrics.json` (held-out greedy exact match per task, training seconds, steps, seed, command, validation
  curve) and optionally a curve PNG. The directory appears only when complete (written beside it, then
  renamed); an existing one needs `--force`.
- `m2pt demo eval [--model DIR] [--n N]` prints per-task and overall held-out greedy exact match (through
  `m2pt.forward`, prompts built by the model's own processor) and writes the numbers as JSON.
- `m2pt demo ask IMAGE QUESTION` prints the model's answer; `m2pt demo examples` draws the README images
  (demo/examples) and records the model's answers to their natural questions in answers.json.
- The schedule is defined in steps, so a run is reproducible for a given seed; `--seconds` only caps wall
  time.
This module does NOT prompt-tune (training/ trainer does) or serve; torch/transformers load inside the
commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_BASE_DIR = REPO_ROOT / "demo" / "base"
DEMO_EXAMPLES_DIR = REPO_ROOT / "demo" / "examples"


class DemoError(RuntimeError):
    """A demo command cannot run as asked (missing model, existing output, bad option); the message says the
    fix."""


@dataclass
class DemoRecipe:
    """Pretraining recipe (feasibility notes §6, with natural phrasings and variable draw sizes added)."""

    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    beta2: float = 0.98
    grad_clip: float = 1.0
    unk_prob: float = 0.1
    draw_sizes: tuple[int, ...] = (64, 96, 128, 256)
    eval_every: int = 250
    val_per_task: int = 50
    held_out_per_task: int = 200


def demo_model_config(seed: int = 0):  # -> TinyLlavaConfig
    """24×24 images in 8 px patches (one patch per grid cell), CLS kept: 10 image tokens; ~3.9 M
    parameters."""
    from training.demo.synthetic import vocabulary
    from training.tiny import TinyLlavaConfig

    return TinyLlavaConfig(
        words=vocabulary(),
        image_size=24,
        patch_size=8,
        vit_dim=128,
        vit_layers=3,
        vit_heads=4,
        vit_mlp=512,
        llm_dim=256,
        llm_layers=3,
        llm_heads=4,
        llm_kv_heads=4,
        llm_mlp=1024,
        select_strategy="full",
        seed=seed,
    )


def lr_factor(step: int, recipe: DemoRecipe) -> float:
    """Linear warmup, then cosine from 1 to `min_lr_ratio` at `recipe.steps`."""
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = min(1.0, (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps))
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _training_examples(rng: random.Random, tasks: list[str], recipe: DemoRecipe) -> list:
    from training.demo.synthetic import sample

    order = [tasks[i % len(tasks)] for i in range(recipe.batch_size)]
    rng.shuffle(order)
    return [sample(task, rng, rng.choice(recipe.draw_sizes)) for task in order]


def _validate(model, batches: list, tasks_per_row: list[str]) -> dict[str, float]:
    """Teacher-forced exact match (= greedy exact match) on the validation batches, per task and overall."""
    import torch

    from training.demo.data import sequence_loss_and_hits

    hits: list[bool] = []
    model.eval()
    with torch.inference_mode():
        for batch in batches:
            logits = model(
                input_ids=batch.input_ids,
                pixel_values=batch.pixel_values,
                attention_mask=batch.attention_mask,
            ).logits  # [B, T, V]
            hits += sequence_loss_and_hits(logits, batch.labels)[1].tolist()
    model.train()
    out = dict.fromkeys(dict.fromkeys(tasks_per_row), 0.0)
    for task in out:
        rows = [h for h, t in zip(hits, tasks_per_row, strict=True) if t == task]
        out[task] = sum(rows) / len(rows)
    out["overall"] = sum(hits) / len(hits)
    return out


def _train_step(model, optimizer, scheduler, batch, grad_clip: float) -> float:
    """One AdamW step on answer-token cross-entropy; returns the loss."""
    import torch

    from training.demo.data import sequence_loss_and_hits

    logits = model(
        input_ids=batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask
    ).logits  # [B, T, V]
    loss = sequence_loss_and_hits(logits, batch.labels)[0]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return loss.item()


def _build(recipe: DemoRecipe, seed: int):
    """Fresh model, processor config, optimizer and LR schedule for a run."""
    import torch

    from training.tiny import build_model, build_processor, build_tokenizer

    cfg = demo_model_config(seed)
    vocab = cfg.vocabulary()
    processor = build_processor(cfg, build_tokenizer(vocab))
    model = build_model(cfg, len(vocab)).train()
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=(0.9, recipe.beta2), weight_decay=recipe.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, recipe))
    return cfg, processor, model, optimizer, scheduler


def run_training(recipe: DemoRecipe, seed: int, seconds: float | None = None):
    """Train from scratch; returns (model, TinyLlavaConfig, curve, stats). No files are written here."""
    from tqdm import tqdm

    from training.demo.data import PromptEncoder, collate, filler_token_ids
    from training.demo.eval import VALIDATION_SEED
    from training.demo.synthetic import TASKS, make_examples

    cfg, processor, model, optimizer, scheduler = _build(recipe, seed)
    encoder = PromptEncoder(processor.tokenizer, model.config.image_seq_length)
    fillers = filler_token_ids(processor.tokenizer)
    tasks = list(TASKS)
    val_examples = make_examples(tasks, recipe.val_per_task, VALIDATION_SEED)
    val_batches = [
        collate(val_examples[i : i + 128], encoder, processor.image_processor)
        for i in range(0, len(val_examples), 128)
    ]
    rng = random.Random(f"m2pt-demo-train:{seed}")
    curve: list[dict] = []
    train_seconds, losses, step = 0.0, [], 0
    bar = tqdm(range(recipe.steps), desc="demo pretrain", unit="step", mininterval=2.0)
    for step in bar:
        start = time.perf_counter()
        batch = collate(
            _training_examples(rng, tasks, recipe),
            encoder,
            processor.image_processor,
            rng=rng,
            unk_prob=recipe.unk_prob,
            filler_ids=fillers,
        )
        losses.append(_train_step(model, optimizer, scheduler, batch, recipe.grad_clip))
        train_seconds += time.perf_counter() - start
        bar.set_postfix(
            loss=f"{losses[-1]:.3f}", samples_s=f"{(step + 1) * recipe.batch_size / train_seconds:.0f}"
        )
        last = step == recipe.steps - 1 or (seconds is not None and train_seconds >= seconds)
        if (step + 1) % recipe.eval_every == 0 or last:
            val = _validate(model, val_batches, [e.task for e in val_examples])
            window = losses[-recipe.eval_every :]
            curve.append(
                {
                    "step": step + 1,
                    "seconds": round(train_seconds, 1),
                    "loss": round(sum(window) / len(window), 4),
                    "val": {k: round(v, 4) for k, v in val.items()},
                }
            )
            log.info(
                "step %d  %.0f s  loss %.4f  val %.3f",
                step + 1,
                train_seconds,
                curve[-1]["loss"],
                val["overall"],
            )
        if last:
            break
    bar.close()
    samples = (step + 1) * recipe.batch_size
    stats = {
        "steps": step + 1,
        "train_seconds": round(train_seconds, 1),
        "samples": samples,
        "samples_per_second": round(samples / train_seconds, 1),
    }
    return model.eval(), cfg, curve, stats


def plot_curve(curve: list[dict], path: Path) -> None:
    """Training loss and validation exact match (per task and overall) against training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = [c["seconds"] for c in curve]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(seconds, [c["loss"] for c in curve], color="black")
    ax_loss.set(
        xlabel="training seconds (CPU)", ylabel="answer-token loss", yscale="log", title="training loss"
    )
    for task in curve[-1]["val"]:
        values = [100 * c["val"][task] for c in curve]
        style = {"color": "black", "linewidth": 2.5} if task == "overall" else {"linewidth": 1}
        ax_acc.plot(seconds, values, label=task, **style)
    ax_acc.set(
        xlabel="training seconds (CPU)",
        ylabel="exact match (%)",
        ylim=(0, 101),
        title="validation exact match (teacher-forced = greedy)",
    )
    ax_acc.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _prepare_out(out: Path, force: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} is a file; pass a directory path")
    if out.exists() and any(out.iterdir()) and not force:
        raise DemoError(f"--out {out} already exists and is not empty; pass --force to replace it")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished directory into place (the old one is removed only after the new one is complete)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _command_line(args: argparse.Namespace) -> str:
    parts = [
        "m2pt demo train",
        f"--out {args.out}",
        f"--steps {args.steps}",
        f"--seed {args.seed}",
        f"--threads {args.threads}",
    ]
    if args.seconds is not None:
        parts.append(f"--seconds {args.seconds:g}")
    return " ".join(parts)


def train_command(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from m2pt.loading import load_frozen_llava
    from training.demo.eval import evaluate
    from training.demo.synthetic import HELD_OUT_TASKS, TASKS
    from training.tiny import build_tiny_llava

    recipe = DemoRecipe(steps=args.steps, held_out_per_task=args.eval_n)
    if min(args.steps, args.eval_n, args.threads) < 1 or (args.seconds is not None and args.seconds <= 0):
        raise DemoError("--steps, --eval-n, --threads and --seconds must be positive")
    out = Path(args.out)
    tmp = _prepare_out(out, args.force)
    torch.set_num_threads(args.threads)
    model, cfg, curve, stats = run_training(recipe, args.seed, args.seconds)
    try:
        build_tiny_llava(tmp, cfg, model=model)
        frozen = load_frozen_llava(str(tmp), device="cpu", dtype="float32")
        held_out = evaluate(frozen, list(TASKS), recipe.held_out_per_task)
        reserved = evaluate(frozen, list(HELD_OUT_TASKS), min(50, recipe.held_out_per_task))
        metrics = {
            "held_out": held_out.to_json(),
            "reserved_tasks_untrained": reserved.to_json(max_misses=5),
            **stats,
            "seed": args.seed,
            "command": _command_line(args),
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(cfg.vocabulary()),
            "threads": args.threads,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "recipe": asdict(recipe),
            "curve": curve,
        }
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.curve_png:
        plot_curve(curve, Path(args.curve_png))
    sys.stdout.write(
        f"wrote {out}: held-out exact match {held_out.overall * 100:.1f} % "
        f"after {stats['steps']} steps / {stats['train_seconds']:.0f} s\n"
    )
    return 0


def _load(args: argparse.Namespace):  # -> FrozenLlava
    import torch

    from m2pt.loading import load_frozen_llava

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise DemoError(
            f"no model at {model_dir} (config.json missing); train one with `m2pt demo train --out DIR`"
        )
    if args.threads < 1:
        raise DemoError("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    try:
        return load_frozen_llava(str(model_dir), device=args.device, dtype=args.dtype)
    except ValueError as exc:
        raise DemoError(str(exc)) from exc


def eval_command(args: argparse.Namespace) -> int:
    from training.demo.eval import HELD_OUT_SEED, evaluate, format_table
    from training.demo.synthetic import HELD_OUT_TASKS, TASKS

    if args.n < 1:
        raise DemoError("--n must be at least 1")
    frozen = _load(args)
    model_dir = Path(args.model)
    tasks = list(HELD_OUT_TASKS) if args.reserved else list(TASKS)
    result = evaluate(frozen, tasks, args.n, seed=HELD_OUT_SEED)
    sys.stdout.write(format_table(result))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"model": _display_path(model_dir), **result.to_json()}, indent=1) + "\n"
        )
    return 0


def ask_command(args: argparse.Namespace) -> int:
    from training.demo.examples import DemoImageError, ask, load_image

    try:
        image = load_image(args.image)
    except DemoImageError as exc:
        raise DemoError(str(exc)) from exc
    sys.stdout.write(ask(_load(args), image, args.question) + "\n")
    return 0


def examples_command(args: argparse.Namespace) -> int:
    from training.demo.examples import record_answers, write_examples

    paths = write_examples(args.out)
    records = record_answers(_load(args), args.out)
    model = _display_path(Path(args.model))
    (Path(args.out) / "answers.json").write_text(
        json.dumps({"model": model, "answers": records}, indent=1) + "\n"
    )
    for r in records:
        mark = "ok " if r["answer"] == r["expected"] else "BAD"
        sys.stdout.write(f"{mark} {r['image']:<26} {r['question']:<30} -> {r['answer']}\n")
    sys.stdout.write(f"wrote {len(paths)} images and answers.json to {args.out}\n")
    return 0


def _display_path(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (so recorded files do not name this
    machine)."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=str(DEMO_BASE_DIR), help="model directory (default: the shipped demo/base)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def _guarded(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except DemoError as exc:
            sys.stderr.write(f"m2pt demo: error: {exc}\n")
            return 2

    return run


def add_demo_commands(subparsers) -> None:
    """Register `m2pt demo train` and `m2pt demo eval`."""
    demo = subparsers.add_parser("demo", help="pretrain or evaluate the shipped demo base model")
    sub = demo.add_subparsers(dest="demo_command", required=True)
    train = sub.add_parser("train", help="pretrain the demo base model from scratch on synthetic data")
    train.add_argument("--out", required=True, help="output directory (e.g. demo/base)")
    train.add_argument("--steps", type=int, default=DemoRecipe.steps, help="optimizer steps of batch 64")
    train.add_argument("--seconds", type=float, default=None, help="stop early after this much training time")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    train.add_argument("--curve-png", default=None, help="also write the training curve here")
    train.add_argument("--force", action="store_true", help="replace an existing --out directory")
    train.add_argument(
        "--eval-n", type=int, default=DemoRecipe.held_out_per_task, help="held-out examples per task"
    )
    train.set_defaults(func=_guarded(train_command))
    ev = sub.add_parser("eval", help="held-out greedy exact match of a demo model")
    ev.add_argument("--n", type=int, default=100, help="held-out examples per task")
    ev.add_argument("--json", default="demo_eval.json", help="write the numbers here ('' to skip)")
    ev.add_argument("--reserved", action="store_true", help="score the reserved held-out tasks instead")
    _model_options(ev)
    ev.set_defaults(func=_guarded(eval_command))
    ask = sub.add_parser("ask", help="answer one question about one local image (PNG/JPEG/WEBP)")
    ask.add_argument("image", help="path of the image")
    ask.add_argument("question", help='e.g. "What color is the shape?"')
    _model_options(ask)
    ask.set_defaults(func=_guarded(ask_command))
    examples = sub.add_parser(
        "examples", help="draw the README example images and record the model's answers"
    )
    examples.add_argument(
        "--out", default=str(DEMO_EXAMPLES_DIR), help="directory for the PNGs and answers.json"
    )
    _model_options(examples)
    examples.set_defaults(func=_guarded(examples_command))
