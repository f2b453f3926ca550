"""`m2pt serve`: run the HTTP server (uvicorn) on a model and a bundle store.

With no arguments it serves the shipped demo model (`demo/base`) with the user's bundle store (`--store`,
default `$M2PT_HOME/bundles`, where uploads go) and, read-only behind it, the shipped demo bundles
(`demo/bundles`), on 127.0.0.1:8000 (use `--host 0.0.0.0` to accept connections from other machines, as the
Dockerfile does). Every `server.settings.Settings` field but the secrets has a flag; the help text is the field's
documentation. Each flag also reads an environment variable, `M2PT_` + the flag's name (`--max-text-tokens` ->
`M2PT_MAX_TEXT_TOKENS`; a flag given wins; list flags take a comma-separated value, switches 1/0, true/false,
yes/no, on/off). Secrets come from the environment only: `M2PT_API_KEY` (chat routes) and `M2PT_OPS_TOKEN` (ops
routes). SIGTERM drains gracefully (`server.api.shutdown`; `--shutdown-timeout`) and exits 0. Bad settings print
one line per problem and exit with status 2 before anything is loaded. The log level is the global
`m2pt --log-level`.

Heavy imports (FastAPI, uvicorn, torch) happen inside `run_serve`, not at import time.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

# (flag, Settings field, argparse kwargs)
_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--model", "model", {"metavar": "PATH_OR_HF_ID"}),
    ("--store", "store", {"metavar": "DIR"}),
    ("--demo-store", "demo_store", {"metavar": "DIR"}),
    ("--host", "host", {}),
    ("--port", "port", {"type": int}),
    ("--device", "device", {"choices": ["auto", "cpu", "cuda"]}),
    ("--dtype", "dtype", {"choices": ["auto", "float32", "bfloat16", "float16"]}),
    ("--max-batch-size", "max_batch_size", {"type": int}),
    ("--max-queue", "max_queue", {"type": int}),
    ("--max-bundles-per-batch", "max_bundles_per_batch", {"type": int}),
    ("--max-num-batched-tokens", "max_num_batched_tokens", {"type": int}),
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
    ("--max-manifest-bytes", "max_manifest_bytes", {"type": int}),
    ("--max-text-tokens", "max_text_tokens", {"type": int}),
    ("--max-visual-tokens", "max_visual_tokens", {"type": int}),
    ("--max-messages", "max_messages", {"type": int}),
    ("--max-stop-strings", "max_stop_strings", {"type": int}),
    ("--max-image-aspect-ratio", "max_image_aspect_ratio", {"type": float}),
    ("--remote-image-allow-private", "remote_image_allow_private", {"action": "store_true", "default": None}),
    ("--remote-image-timeout", "remote_image_timeout_s", {"type": float, "metavar": "SECONDS"}),
    ("--remote-image-max-bytes", "remote_image_max_bytes", {"type": int}),
]
_FLAG_OF = {field: flag for flag, field, _ in _FLAGS}
_SECRET_ENV = {"api_key": "M2PT_API_KEY", "ops_token": "M2PT_OPS_TOKEN"}  # environment only, never a flag
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


def env_var(flag: str) -> str:
    """The environment variable a flag reads: `--max-text-tokens` -> `M2PT_MAX_TEXT_TOKENS`."""
    return "M2PT_" + flag.lstrip("-").upper().replace("-", "_")


def _from_env(text: str, kwargs: Mapping[str, Any]) -> Any:
    """An environment value as its flag would parse it (Settings validates it after)."""
    if kwargs.get("action") == "append":
        return [part.strip() for part in text.split(",") if part.strip()]
    if kwargs.get("action") == "store_true":
        word = text.strip().lower()
        return True if word in _TRUE else False if word in _FALSE else text
    return text


_UVICORN_GRACE_S = 5.0  # uvicorn's own wait for connections after our drain has ended


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `m2pt serve` on the `m2pt` parser's subparsers."""
    from server.settings import Settings

    parser = subparsers.add_parser(
        "serve",
        help="serve a model and its prompt bundles over HTTP (OpenAI-compatible)",
        description="Serve a frozen multimodal model and M²PT prompt bundles over HTTP. Secrets come from "
        "the environment: M2PT_API_KEY (chat routes) and M2PT_OPS_TOKEN (ops routes; unset = ops API off).",
    )
    for flag, field, kwargs in _FLAGS:
        info = Settings.model_fields[field]
        default = info.get_default(call_default_factory=False)
        says_default = info.default_factory is not None or "default" in (info.description or "")
        kwargs = {"default": None, **kwargs}
        shown = info.description if says_default else f"{info.description} (default: {default})"
        parser.add_argument(flag, dest=field, help=f"{shown} (env {env_var(flag)})", **kwargs)
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log one line per HTTP request (default: on)",
    )
    from server.cluster.options import add_cluster_flags  # pure argparse; Ray loads only with --replicas

    add_cluster_flags(parser)
    parser.set_defaults(func=run_serve)
    return parser


def env_settings(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Settings values from the flags' environment variables that are set."""
    environ = os.environ if environ is None else environ
    return {
        field: _from_env(environ[env_var(flag)], kwargs)
        for flag, field, kwargs in _FLAGS
        if env_var(flag) in environ
    }


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None):
    """`Settings` from the flags that were given, then their environment variables; the rest keep defaults."""
    from server.settings import Settings

    given = {field: getattr(args, field) for _, field, _ in _FLAGS if getattr(args, field, None) is not None}
    values = {**env_settings(environ), **given}
    if "remote_image_domains" in values:
        values["remote_image_domains"] = tuple(values["remote_image_domains"])
    return Settings(**values)


def describe_settings_error(exc: Exception, from_env: frozenset[str] = frozenset()) -> str:
    """One line per problem, naming the flag (or the environment variable `from_env` fields came from)."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for err in exc.errors():
        field = str(err["loc"][0]) if err.get("loc") else ""
        flag = _FLAG_OF.get(field, field)
        where = _SECRET_ENV.get(field) or (env_var(flag) if field in from_env else flag)
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "\n".join(lines)


def run_serve(args: argparse.Namespace) -> int:
    """Validate the settings, build the app and run uvicorn until it is stopped. Returns the exit status."""
    from pydantic import ValidationError

    from m2pt.preflight import UntestedTransformersError, check_transformers_version
    from server.settings import SettingsError

    try:
        settings = settings_from_args(args)
        settings.check_paths()
        check_transformers_version()
    except (ValidationError, SettingsError, UntestedTransformersError) as exc:
        given = {field for _, field, _ in _FLAGS if getattr(args, field, None) is not None}
        for line in describe_settings_error(exc, frozenset(env_settings()) - given).splitlines():
            sys.stderr.write(f"m2pt serve: {line}\n")
        return 2
    if getattr(args, "replicas", 0):
        return _run_cluster(args, settings)
    import uvicorn

    from server.api.shutdown import GracefulServer
    from server.app import create_app

    log.info(
        "starting m2pt serve on http://%s:%d, playground at / (model %s, store %s, read-only beside it: %s)",
        settings.host,
        settings.port,
        settings.model,
        settings.store,
        ", ".join(map(str, settings.read_only_stores)) or "none",
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


def _run_cluster(args: argparse.Namespace, settings) -> int:
    """`m2pt serve --replicas N`: the same API over N engine replicas on Ray Serve (docs/cluster.md)."""
    from server.cluster.options import cluster_options

    try:
        options = cluster_options(args)
        import ray.serve  # noqa: F401  (the optional extra)

        from server.cluster.launch import run_cluster
    except (ValueError, ImportError) as exc:
        hint = " (install the extra: pip install -e .[cluster])" if isinstance(exc, ImportError) else ""
        sys.stderr.write(f"m2pt serve: {exc}{hint}\n")
        return 2
    from server.cluster.launch import RayExposedError

    level = str(getattr(args, "log_level", "info"))
    try:
        return run_cluster(settings, options, access_log=args.access_log, log_level=level)
    except RayExposedError as exc:
        sys.stderr.write(f"m2pt serve: {exc}\n")
        return 2
