"""`m2pt train`: argparse wiring for the trainer (`m2pt train-ablation` is the demo's: `training.demo.ablation`).

`add_train_commands(subparsers)` registers the subcommand on the `m2pt` parser; `python -m training ARGS`
(also under `torchrun --nproc-per-node N -m training ARGS`) runs `m2pt train ARGS` without the other packages'
commands. torch and transformers are imported inside the command functions, never at import time. Errors the
user can fix (bad data, bad options, unreachable server) end with a one-line message and exit status 2, not a
traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from typing import Any

from training.config import TrainConfig

log = logging.getLogger(__name__)


def _value_type(hint: Any) -> Any:
    """`int | None` -> int; `float` -> float."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _flag_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse keywords of one `TrainConfig` field (its metadata, its type, its default)."""
    meta = {k: v for k, v in f.metadata.items() if k not in ("group", "exclusive", "flag")}
    kind = _value_type(hint)
    default = None if f.default is dataclasses.MISSING else f.default
    if kind is bool and "action" not in meta:
        meta["action"] = argparse.BooleanOptionalAction  # adds "(default: ...)" itself
    elif kind in (int, float):
        meta["type"] = kind
    if default is not None and kind is not bool:
        meta["help"] = f"{meta['help']} (default: {default})"
    return {**meta, "default": default} if not meta.get("required") else meta


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per `TrainConfig` field, in field order and groups; help = the field's `metadata["help"]`."""
    hints = typing.get_type_hints(TrainConfig)
    groups: dict[str | None, Any] = {None: p}
    exclusive: dict[str, Any] = {}
    for f in dataclasses.fields(TrainConfig):
        title = f.metadata.get("group")
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        target = groups[title]
        if "exclusive" in f.metadata:
            name = f.metadata["exclusive"]
            if name not in exclusive:
                exclusive[name] = target.add_mutually_exclusive_group()
            target = exclusive[name]
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        target.add_argument(flag, dest=f.name, **_flag_kwargs(f, hints[f.name]))


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


def add_train_commands(subparsers) -> None:
    """Register `train` on the `m2pt` subparsers."""
    p = subparsers.add_parser(
        "train",
        help="prompt-tune a frozen LLaVA with M²PT and export a bundle",
        description="Prompt-tune a frozen LLaVA with M²PT (deep visual + deep textual prompts + projector) "
        "and export a bundle.",
    )
    add_train_arguments(p)
    p.set_defaults(func=run_train)


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
