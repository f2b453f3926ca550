"""`m2pt train` and `m2pt train-ablation`: argparse wiring for the trainer and the digits ablation.

`add_train_commands(subparsers)` registers both subcommands on the `m2pt` parser; `python -m training ARGS`
(also under `torchrun --nproc-per-node N -m training ARGS`) runs `m2pt train ARGS` without the other packages'
commands. torch and transformers are imported inside the command functions, never at import time. Errors the
user can fix (bad data, bad options, unreachable server) end with a one-line message and exit status 2, not a
traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from training.config import TrainConfig

log = logging.getLogger(__name__)

DEFAULTS = TrainConfig(base="", data="", out="")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument(
        "--base", required=True, help="frozen LLaVA base: local directory or HF id (e.g. demo/base)"
    )
    p.add_argument(
        "--data",
        required=True,
        help="LLaVA-format JSON file, or a built-in dataset: digits, digits:test, synthetic:<task>[,<task>]",
    )
    p.add_argument(
        "--out", required=True, help="bundle directory to write (missing, empty, or an older bundle)"
    )
    p.add_argument("--name", help="bundle name (default: the --out directory name)")
    p.add_argument("--version", help="bundle version (default: assigned by the store)")
    g = p.add_argument_group("data")
    g.add_argument(
        "--eval-data", help="held-out dataset (default: digits:test for digits, a fixed split of a JSON file)"
    )
    g.add_argument(
        "--image-folder", help="folder that JSON image paths are relative to (default: the JSON's folder)"
    )
    g.add_argument(
        "--train-size", type=int, help="cap on training records (synthetic: number drawn, default 2000)"
    )
    g.add_argument(
        "--eval-size", type=int, help="cap on held-out records (synthetic: number drawn, default 200)"
    )
    g.add_argument(
        "--eval-fraction",
        type=float,
        default=d.eval_fraction,
        help="held-out share of a JSON file without --eval-data",
    )
    g.add_argument(
        "--on-bad-record",
        choices=["skip", "fail"],
        default=d.on_bad_record,
        help="what to do with a bad record (missing/unreadable image, no <image>, empty answer)",
    )
    g = p.add_argument_group("what is trained")
    g.add_argument(
        "--visual-prompts",
        type=int,
        default=d.visual_prompts,
        help="visual prompt tokens per ViT layer (0: none)",
    )
    g.add_argument(
        "--text-prompts",
        type=int,
        default=d.text_prompts,
        help="textual prompt tokens per LLM layer (0: none)",
    )
    g.add_argument(
        "--tune-projector",
        action=argparse.BooleanOptionalAction,
        default=d.tune_projector,
        help="also train (a copy of) the vision-language projector, as M²PT does",
    )
    g = p.add_argument_group("recipe (M²PT defaults)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimiser steps (overrides --epochs)")
    length.add_argument("--epochs", type=float, default=d.epochs, help="passes over the training set")
    g.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="global batch, split across torchrun processes"
    )
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the prompts")
    g.add_argument("--projector-lr", type=float, help="peak learning rate of the projector (default: --lr)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument(
        "--warmup-ratio", type=float, default=d.warmup_ratio, help="linear warmup share of the steps"
    )
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: off)")
    g.add_argument("--seed", type=int, default=d.seed, help="prompt init and data order")
    g = p.add_argument_group("evaluation, checkpoints, output")
    g.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="held-out evaluation every N steps (0: only at the end)",
    )
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--checkpoint-dir", help="where checkpoints go (default: OUT.ckpt beside the bundle)")
    g.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help="checkpoint every N steps (0: never)"
    )
    g.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in --checkpoint-dir"
    )
    g.add_argument(
        "--publish-store",
        help="also publish the bundle into this BundleStore root (e.g. ~/.local/share/m2pt/bundles, the "
        "user store m2pt serve reads; the shipped demo store is read-only)",
    )
    g.add_argument("--push-url", help="also upload the bundle to this server (needs $M2PT_OPS_TOKEN)")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda (torchrun: cuda:LOCAL_RANK)")
    g.add_argument(
        "--dtype", default=d.dtype, help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16"
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = set(TrainConfig.field_names())
    values = {k: v for k, v in vars(args).items() if k in names}
    if values.get("epochs") is None:
        values.pop("epochs", None)
    return TrainConfig(**values)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'fix your input', reported without a traceback."""
    from prompts_store.errors import BundleError
    from training.checkpoint import CheckpointError
    from training.config import ConfigError
    from training.export import ExportError
    from training.records import DataError

    return (ConfigError, DataError, CheckpointError, ExportError, BundleError)


def run_train(args: argparse.Namespace) -> int:
    from training.trainer import train

    cfg = None
    try:
        cfg = config_from_args(args)
        result = train(cfg)
    except user_errors() as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        sys.stderr.write(f"m2pt train: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return report_interrupt(cfg)
    if result.bundle_dir is not None:
        acc = "n/a" if result.final_accuracy is None else f"{100 * result.final_accuracy:.1f}%"
        sys.stdout.write(
            f"bundle {cfg.bundle_name} -> {result.bundle_dir} (held-out exact match {acc}, "
            f"{result.steps} steps, {result.seconds:.0f} s)\n"
        )
    return 0


def report_interrupt(cfg: TrainConfig | None) -> int:
    """Ctrl-C: one line with the `--resume` hint, no traceback; exit status 130 (a shell's SIGINT)."""
    from training.interrupt import interrupted_message

    message = interrupted_message(cfg) if cfg is not None else "m2pt train: interrupted"
    sys.stderr.write("\n" + message + "\n")
    return 130


def run_ablation(args: argparse.Namespace) -> int:
    from training.ablation import main_from_args

    return main_from_args(args)


def add_train_commands(subparsers) -> None:
    """Register `train` and `train-ablation` on the `m2pt` subparsers."""
    p = subparsers.add_parser(
        "train",
        help="prompt-tune a frozen LLaVA with M²PT and export a bundle",
        description="Prompt-tune a frozen LLaVA with M²PT (deep visual + deep textual prompts + projector) "
        "and export a bundle.",
    )
    add_train_arguments(p)
    p.set_defaults(func=run_train)
    from training.ablation import add_ablation_arguments

    a = subparsers.add_parser(
        "train-ablation",
        help="digits ablation: base vs textual vs visual vs M²PT",
        description="Train the ablation variants on digits and write docs/ablation.{md,png}.",
    )
    add_ablation_arguments(a)
    a.set_defaults(func=run_ablation)


def main(argv: list[str] | None = None) -> int:
    """`python -m training ...` == `m2pt train ...` (a leading `train` is accepted and dropped)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="python -m training", description="M²PT prompt tuning (same flags as m2pt train)"
    )
    parser.add_argument("--log-level", default="INFO")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_train(args)
