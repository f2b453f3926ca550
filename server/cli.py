"""`m2pt serve`: run the HTTP server (uvicorn) on a model and a bundle store.

With no arguments it serves the shipped demo model (`demo/base`) and demo bundles (`demo/bundles`) on
127.0.0.1:8000 (use `--host 0.0.0.0` to accept connections from other machines, as the Dockerfile does). Every
flag maps to one `server.settings.Settings` field; the help text is the field's documentation. Secrets come
from the environment only: `M2PT_API_KEY` (chat routes) and `M2PT_OPS_TOKEN` (ops routes). SIGTERM drains
gracefully (`server.shutdown`; `--shutdown-timeout` or `M2PT_SHUTDOWN_TIMEOUT`) and exits 0. Bad settings
print one line per problem and exit with status 2 before anything is loaded. The log level is the global `m2pt
--log-level`.

Heavy imports (FastAPI, uvicorn, torch) happen inside `run_serve`, not at import time.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

# (flag, Settings field, argparse kwargs)
_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--model", "model", {"metavar": "PATH_OR_HF_ID"}),
    ("--store", "store", {"metavar": "DIR"}),
    ("--host", "host", {}),
    ("--port", "port", {"type": int}),
    ("--device", "device", {"choices": ["auto", "cpu", "cuda"]}),
    ("--dtype", "dtype", {"choices": ["auto", "float32", "bfloat16", "float16"]}),
    ("--max-batch-size", "max_batch_size", {"type": int}),
    ("--max-queue", "max_queue", {"type": int}),
    ("--max-bundles-per-batch", "max_bundles_per_batch", {"type": int}),
    ("--max-resident-bundles", "max_resident_bundles", {"type": int}),
    ("--image-cache-size", "image_cache_size", {"type": int}),
    ("--request-timeout", "request_timeout_s", {"type": float, "metavar": "SECONDS"}),
    ("--max-tokens-limit", "max_tokens_limit", {"type": int}),
    ("--default-max-tokens", "default_max_tokens", {"type": int}),
    ("--max-instruction-chars", "max_instruction_chars", {"type": int}),
    ("--max-images-per-request", "max_images_per_request", {"type": int}),
    ("--max-body-bytes", "max_body_bytes", {"type": int}),
    ("--max-image-pixels", "max_image_pixels", {"type": int}),
    ("--max-image-side", "max_image_side", {"type": int}),
    ("--allow-remote-images", "allow_remote_images", {"action": "store_true", "default": None}),
    ("--remote-image-domain", "remote_image_domains", {"action": "append", "metavar": "HOST"}),
    ("--max-bundle-bytes", "max_bundle_bytes", {"type": int}),
    ("--shutdown-timeout", "shutdown_timeout_s", {"type": float, "metavar": "SECONDS"}),
]
_FLAG_OF = {field: flag for flag, field, _ in _FLAGS}
_UVICORN_GRACE_S = 5.0  # uvicorn's own wait for connections after our drain has ended


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `m2pt serve` on the `m2pt` parser's subparsers."""
    from server.settings import Settings

    parser = subparsers.add_parser(
        "serve",
        help="serve a model and its prompt bundles over HTTP (OpenAI-compatible)",
        description="Serve a frozen LLaVA-style model and M²PT prompt bundles over HTTP. Secrets come from "
        "the environment: M2PT_API_KEY (chat routes) and M2PT_OPS_TOKEN (ops routes; unset = ops API off).",
    )
    for flag, field, kwargs in _FLAGS:
        info = Settings.model_fields[field]
        default = info.get_default(call_default_factory=False)
        kwargs = {"default": None, **kwargs}
        parser.add_argument(flag, dest=field, help=f"{info.description} (default: {default})", **kwargs)
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log one line per HTTP request (default: on)",
    )
    parser.set_defaults(func=run_serve)
    return parser


def settings_from_args(args: argparse.Namespace):
    """`Settings` from the flags that were given (the others keep their defaults)."""
    from server.settings import Settings

    values = {field: getattr(args, field) for _, field, _ in _FLAGS if getattr(args, field, None) is not None}
    if "remote_image_domains" in values:
        values["remote_image_domains"] = tuple(values["remote_image_domains"])
    return Settings(**values)


def describe_settings_error(exc: Exception) -> str:
    """One line per problem, naming the flag (or environment variable) to fix."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err.get("loc") else ""
        where = {"api_key": "M2PT_API_KEY", "ops_token": "M2PT_OPS_TOKEN"}.get(
            field, _FLAG_OF.get(field, field)
        )
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "\n".join(lines)


def run_serve(args: argparse.Namespace) -> int:
    """Validate the settings, build the app and run uvicorn until it is stopped. Returns the exit status."""
    from pydantic import ValidationError

    from server.settings import SettingsError

    try:
        settings = settings_from_args(args)
        settings.check_paths()
    except (ValidationError, SettingsError) as exc:
        for line in describe_settings_error(exc).splitlines():
            sys.stderr.write(f"m2pt serve: {line}\n")
        return 2
    import uvicorn

    from server.app import create_app
    from server.shutdown import GracefulServer

    log.info(
        "starting m2pt serve on http://%s:%d (model %s, store %s)",
        settings.host,
        settings.port,
        settings.model,
        settings.store,
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the logging set up by `m2pt --log-level`
        log_level=str(getattr(args, "log_level", "info")).lower(),
        access_log=args.access_log,
        timeout_graceful_shutdown=_UVICORN_GRACE_S,  # our own drain (GracefulServer) comes first
        server_header=False,
    )
    server = GracefulServer(config, app, settings.shutdown_timeout_s)
    server.run()
    return 0 if server.started else 1
