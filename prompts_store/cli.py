"""`m2pt bundle ...`: inspect, validate, list, rm, push and publish prompt bundles from the command line.

`add_bundle_commands(subparsers)` registers `bundle` and its subcommands; each sets `func(args) -> int` (exit
code: 0 ok, 1 the bundle/store/server refused, with the reason on stderr). Output goes to stdout (JSON where
structured). `--store` defaults to `$M2PT_STORE`, else the store `m2pt serve` uses by default
(`<repo>/demo/bundles`). `--model` reads only the checkpoint's config (no weights are loaded). Heavy imports
happen inside the command functions. `main(argv)` runs `m2pt bundle`-style argv without the rest of the
console script. This module does not serve HTTP.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
DEFAULT_STORE = Path(__file__).resolve().parents[1] / "demo" / "bundles"
TOKEN_ENV = "M2PT_OPS_TOKEN"


def default_store() -> str:
    return os.environ.get("M2PT_STORE") or str(DEFAULT_STORE)


def _out(payload: Any) -> None:
    text = payload if isinstance(payload, str) else json.dumps(payload, indent=2, sort_keys=True)
    sys.stdout.write(text + "\n")


def _fail(message: str) -> int:
    sys.stderr.write(f"error: {message}\n")
    return 1


def spec_from_checkpoint(model: str):  # -> ModelSpec
    """The `ModelSpec` of a checkpoint (local dir or hub id) from its config alone, through the startup gate's
    config and module checks (`m2pt.loading.spec_from_checkpoint`); unsupported models raise
    `UnsupportedModelError`."""
    from m2pt.loading import spec_from_checkpoint as gated_spec

    return gated_spec(model)


def _limits(args: argparse.Namespace):
    from prompts_store.limits import BundleLimits

    defaults = BundleLimits()
    return BundleLimits(
        max_text_tokens=args.max_text_tokens or defaults.max_text_tokens,
        max_visual_tokens=args.max_visual_tokens or defaults.max_visual_tokens,
        max_bytes=args.max_bytes or defaults.max_bytes,
    )


def _dir_summary(path: Path) -> dict[str, Any]:
    from prompts_store.format import read_manifest

    m = read_manifest(path)
    return {
        "path": str(path),
        "label": m.label,
        "content_hash": m.content_hash,
        "created_at": m.created_at,
        "base_model": {"model_id": m.base_model.model_id, "fingerprint": m.base_model.fingerprint},
        "text_prompts": m.text_prompts,
        "visual_prompts": m.visual_prompts,
        "has_projector": m.has_projector,
        "dtype": m.dtype,
        "shapes": {k: v.shape for k, v in sorted(m.tensors.items())},
        "size_bytes": sum(f.stat().st_size for f in path.iterdir()),
        "provenance": m.provenance,
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    from prompts_store.store import BundleStore

    target = Path(args.target)
    if target.is_dir():
        _out(_dir_summary(target))
    else:
        _out([v.to_json() for v in BundleStore(args.store).inspect(args.target)])
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from prompts_store.format import load_bundle

    spec = spec_from_checkpoint(args.model) if args.model else None
    loaded = load_bundle(args.dir, spec, _limits(args))
    against = f"base model {spec.model_id}" if spec else "the base model its manifest names"
    _out(
        f"OK {loaded.label} {loaded.content_hash} ({loaded.nbytes} bytes of float32 tensors; "
        f"checked against {against})"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from prompts_store.store import BundleStore

    infos = BundleStore(args.store).list()
    if args.json:
        _out(
            [
                {
                    "name": i.name,
                    "latest": i.latest.label,
                    "content_hash": i.latest.content_hash,
                    "versions": i.versions,
                }
                for i in infos
            ]
        )
        return 0
    rows = [("NAME", "LATEST", "VERSIONS", "CONTENT HASH")]
    rows += [(i.name, i.latest.version, ",".join(i.versions), i.latest.content_hash[:23]) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    _out("\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from prompts_store.names import parse_ref
    from prompts_store.store import BundleStore

    name, version = parse_ref(args.ref)
    refs = BundleStore(args.store).delete(name, version)
    _out("deleted " + " ".join(r.label for r in refs))
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from prompts_store.store import BundleStore

    spec = spec_from_checkpoint(args.model) if args.model else None
    ref = BundleStore(args.store).publish(
        args.dir, name=args.name, version=args.version, spec=spec, limits=_limits(args)
    )
    _out({"bundle": ref.label, "content_hash": ref.content_hash, "path": str(ref.path)})
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    import httpx

    from prompts_store.format import MANIFEST_FILE, TENSORS_FILE, read_bundle_bytes
    from prompts_store.limits import BundleLimits

    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        return _fail(f"no ops token: pass --token or set ${TOKEN_ENV}")
    manifest_bytes, tensor_bytes = read_bundle_bytes(args.dir, BundleLimits(max_bytes=1 << 62))
    files = {
        "manifest": (MANIFEST_FILE, manifest_bytes, "application/json"),
        "tensors": (TENSORS_FILE, tensor_bytes, "application/octet-stream"),
    }
    fields = {k: v for k, v in (("name", args.name), ("version", args.version)) if v}
    url = args.url.rstrip("/") + "/v1/bundles"
    try:
        resp = httpx.post(
            url, files=files, data=fields, headers={"Authorization": f"Bearer {token}"}, timeout=args.timeout
        )
    except httpx.HTTPError as exc:
        return _fail(f"could not reach {url}: {exc}")
    try:
        body = resp.json()
    except ValueError:
        body = {"raw": resp.text[:2000]}
    if resp.is_success:
        _out(body)
        return 0
    error = body.get("error", {}) if isinstance(body, dict) else {}
    message = error.get("message") if isinstance(error, dict) else None
    return _fail(f"server answered {resp.status_code}: {message or json.dumps(body)[:2000]}")


def _guarded(func):
    """Run a command; bundle/store errors and unreadable paths become exit code 1 with the message on
    stderr."""

    def run(args: argparse.Namespace) -> int:
        from m2pt.families.base import UnsupportedModelError
        from prompts_store.errors import BundleError

        try:
            return func(args)
        except BundleError as exc:
            return _fail(f"{exc} [{exc.error_type}]")
        except UnsupportedModelError as exc:
            return _fail(f"{exc} [unsupported_model]")
        except OSError as exc:
            return _fail(str(exc))

    run.__name__ = func.__name__
    return run


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-text-tokens", type=int, help="textual prompt tokens allowed per layer (default 64)")
    p.add_argument(
        "--max-visual-tokens", type=int, help="visual prompt tokens allowed per layer (default 64)"
    )
    p.add_argument("--max-bytes", type=int, help="size cap of the bundle in bytes (default 256 MiB)")


def add_bundle_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `bundle` with subcommands inspect, validate, list, rm, push, publish."""
    bundle = subparsers.add_parser("bundle", help="inspect, validate, publish and manage prompt bundles")
    sub = bundle.add_subparsers(dest="bundle_command", required=True)
    store_help = "bundle store directory (default: $M2PT_STORE, else the demo store m2pt serve uses)"

    p = sub.add_parser("inspect", help="show a bundle directory, or a stored bundle NAME / NAME@VERSION")
    p.add_argument("target", help="bundle directory, or NAME / NAME@VERSION in the store")
    p.add_argument("--store", default=default_store(), help=store_help)
    p.set_defaults(func=_guarded(cmd_inspect))

    p = sub.add_parser("validate", help="run every load-time check on a bundle directory")
    p.add_argument("dir", help="bundle directory (manifest.json + tensors.safetensors)")
    p.add_argument("--model", help="base model dir or hub id to check compatibility against (config only)")
    _add_limit_flags(p)
    p.set_defaults(func=_guarded(cmd_validate))

    p = sub.add_parser("list", help="list the bundles in a store")
    p.add_argument("--store", default=default_store(), help=store_help)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_guarded(cmd_list))

    p = sub.add_parser("rm", help="delete NAME (every version) or NAME@VERSION from a store")
    p.add_argument("ref", metavar="NAME[@VERSION]")
    p.add_argument("--store", default=default_store(), help=store_help)
    p.set_defaults(func=_guarded(cmd_rm))

    p = sub.add_parser("push", help="upload a bundle directory to a running server (POST URL/v1/bundles)")
    p.add_argument("dir", help="bundle directory")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--token", help=f"ops token (default: ${TOKEN_ENV})")
    p.add_argument("--name", help="publish under this name (default: the manifest's)")
    p.add_argument("--version", help="explicit version (default: the server assigns the next v<N>)")
    p.add_argument(
        "--timeout", type=float, default=300.0, help="seconds to wait for the server (default 300)"
    )
    p.set_defaults(func=_guarded(cmd_push))

    p = sub.add_parser("publish", help="validate a bundle directory and publish it into a store as NAME@vN")
    p.add_argument("dir", help="bundle directory")
    p.add_argument("--store", default=default_store(), help=store_help)
    p.add_argument("--name", help="publish under this name (default: the manifest's)")
    p.add_argument("--version", help="explicit version (default: the next v<N>)")
    p.add_argument("--model", help="base model dir or hub id to check compatibility against (config only)")
    _add_limit_flags(p)
    p.set_defaults(func=_guarded(cmd_publish))


def main(argv: list[str] | None = None) -> int:
    """Run `bundle` subcommands alone: `python -m prompts_store.cli list --store DIR`."""
    parser = argparse.ArgumentParser(prog="m2pt")
    add_bundle_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bundle", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    logging.basicConfig(level="INFO")
    sys.exit(main())
