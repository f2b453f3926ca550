"""The `m2pt` console script: one argparse parser whose subcommands are contributed by each package.

Each package exposes `add_<x>_command(s)(subparsers)` that registers its subcommand(s) and sets `func` on the parsed
namespace. Heavy imports (torch, transformers, FastAPI) happen inside the command functions, not here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (module, registration function): the order is the order in `m2pt --help`.
COMMAND_PROVIDERS = [
    ("server.cli", "add_serve_command"),
    ("training.cli", "add_train_commands"),
    ("training.demo.ablation", "add_ablation_command"),
    ("prompts_store.cli", "add_bundle_commands"),
    ("training.demo.base", "add_demo_commands"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m2pt", description="Serve and train M²PT prompt bundles on a frozen LLaVA."
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING, ...)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name, func_name in COMMAND_PROVIDERS:
        module = importlib.import_module(module_name)
        getattr(module, func_name)(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
