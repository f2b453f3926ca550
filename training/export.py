"""Hand a trained prompt set over: bundle v1 on disk, curves PNG beside it, optional publish to a store or
push to a server.

- `export_bundle` writes `OUT/` through `prompts_store.format.save_bundle` (validated against the base's spec,
  atomic) and the curves to `OUT.curves.png` beside it: a bundle directory holds exactly its manifest and
  tensors.
- `publish` copies the bundle into a writable `BundleStore` root (e.g. the user store `$M2PT_HOME/bundles`),
  layered over the shipped demo bundles so its auto versions continue after theirs, and its curves to
  `ROOT/<name>@<version>.curves.png` (`m2pt bundle rm` removes them with the version). The shipped demo store
  itself is read-only: publishing into it is refused unless `$M2PT_WRITE_DEMO_STORE=1` (maintainers
  rebuilding the shipped bundles).
- `push` POSTs it to a running server: multipart `manifest` + `tensors` to `/v1/bundles` with `Authorization:
  Bearer $M2PT_OPS_TOKEN`.
`check_outputs` validates these options *before* training, so a bad URL or missing token does not cost a run.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from m2pt.prompts import PromptTensors
from m2pt.spec import ModelSpec
from training.plots import plot_curves

log = logging.getLogger(__name__)

OPS_TOKEN_ENV = "M2PT_OPS_TOKEN"
PUSH_TIMEOUT_S = 60.0


class ExportError(RuntimeError):
    """The bundle could not be published or pushed; the message says why and what to change."""


def curves_path(bundle_dir: str | Path) -> Path:
    bundle_dir = Path(bundle_dir)
    return bundle_dir.with_name(bundle_dir.name + ".curves.png")


def bundles_endpoint(url: str) -> str:
    """`http://host:8000` or `.../v1/bundles` -> the `/v1/bundles` URL; refuses non-HTTP URLs."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ExportError(
            f"--push-url {url!r} must be an http(s) URL of an m2pt server, e.g. http://localhost:8000"
        )
    base = url.rstrip("/")
    return base if base.endswith("/v1/bundles") else base + "/v1/bundles"


def check_outputs(out: str, publish_store: str | None, push_url: str | None) -> None:
    """Fail fast on output options that cannot work."""
    out_path = Path(out)
    if out_path.exists() and (
        not out_path.is_dir()
        or any(p.name not in {"manifest.json", "tensors.safetensors"} for p in out_path.iterdir())
    ):
        raise ExportError(
            f"--out {out} exists and is not an empty or bundle directory; choose a new directory"
        )
    if push_url is not None:
        bundles_endpoint(push_url)
        if not os.environ.get(OPS_TOKEN_ENV):
            raise ExportError(f"--push-url needs the server's ops token in ${OPS_TOKEN_ENV}")
        check_push_target(push_url, os.environ[OPS_TOKEN_ENV])
    if publish_store is not None and Path(publish_store).exists() and not Path(publish_store).is_dir():
        raise ExportError(f"--publish-store {publish_store} exists and is not a directory")
    if publish_store is not None:
        check_not_demo_store(publish_store)


def check_push_target(url: str, token: str, timeout: float = 10.0) -> None:
    """Before training: the server at `url` answers its ops API (`GET /v1/bundles`) and accepts `token`."""
    import httpx

    endpoint = bundles_endpoint(url)
    try:
        reply = httpx.get(endpoint, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ExportError(
            f"--push-url: cannot reach {endpoint} ({exc}); start the server first (m2pt serve) or fix the URL"
        ) from None
    if reply.status_code in (401, 403):
        raise ExportError(
            f"--push-url: {endpoint} refused the ops token (HTTP {reply.status_code}); set ${OPS_TOKEN_ENV} "
            "to the token the server was started with"
        )
    if reply.status_code != 200:
        raise ExportError(
            f"--push-url: {endpoint} answered HTTP {reply.status_code}; is it an m2pt server's base URL?"
        )


def check_not_demo_store(store_root: str | Path) -> None:
    """Refuse the shipped (read-only) demo store as a publish target, unless `$M2PT_WRITE_DEMO_STORE=1`."""
    from prompts_store.layered import DEMO_STORE_DIR, same_dir

    if same_dir(store_root, DEMO_STORE_DIR) and os.environ.get("M2PT_WRITE_DEMO_STORE") != "1":
        raise ExportError(
            f"--publish-store {store_root} holds the shipped demo bundles and is read-only; publish to the "
            "user store instead (`m2pt bundle publish OUT` puts it where `m2pt serve` finds it)"
        )


def export_bundle(
    out: str | Path,
    prompts: PromptTensors,
    spec: ModelSpec,
    name: str,
    version: str | None,
    provenance: dict[str, Any],
    history: dict[str, Any],
) -> Path:
    """Write the bundle and its curves PNG; returns the bundle directory."""
    from prompts_store.format import save_bundle

    bundle_dir = save_bundle(out, prompts, spec, name, version=version, provenance=provenance)
    dataset = provenance.get("dataset", {})
    title = f"bundle {name}: trained on {dataset.get('train')}, evaluated on {dataset.get('eval')}"
    plot_curves(history, curves_path(bundle_dir), title)
    return Path(bundle_dir)


def publish(bundle_dir: Path, store_root: str | Path, name: str, version: str | None) -> Any:
    """Publish into a filesystem `BundleStore` (curves PNG beside the name); returns its `BundleRef`."""
    from prompts_store.layered import DEMO_STORE_DIR, open_layered_store

    check_not_demo_store(store_root)
    ref = open_layered_store(store_root, [DEMO_STORE_DIR]).publish(bundle_dir, name, version)
    curves = curves_path(bundle_dir)
    if curves.is_file():
        shutil.copyfile(curves, Path(store_root) / f"{ref.label}.curves.png")
    log.info("published %s to store %s", ref, store_root)
    return ref


def push(
    bundle_dir: Path, url: str, token: str | None = None, timeout: float = PUSH_TIMEOUT_S
) -> dict[str, Any]:
    """Upload the bundle to a running server; returns the server's JSON reply."""
    import httpx

    from prompts_store.format import MANIFEST_FILE, TENSORS_FILE

    endpoint = bundles_endpoint(url)
    token = token or os.environ.get(OPS_TOKEN_ENV)
    if not token:
        raise ExportError(f"pushing needs the server's ops token in ${OPS_TOKEN_ENV}")
    files = {
        "manifest": (MANIFEST_FILE, (bundle_dir / MANIFEST_FILE).read_bytes(), "application/json"),
        "tensors": (TENSORS_FILE, (bundle_dir / TENSORS_FILE).read_bytes(), "application/octet-stream"),
    }
    try:
        reply = httpx.post(
            endpoint, files=files, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )
    except httpx.HTTPError as exc:
        raise ExportError(f"could not reach {endpoint}: {exc}") from exc
    if reply.status_code >= 400:
        raise ExportError(f"{endpoint} refused the bundle: HTTP {reply.status_code} {reply.text[:500]}")
    log.info("pushed %s to %s (HTTP %d)", bundle_dir.name, endpoint, reply.status_code)
    try:
        return reply.json()
    except ValueError:
        return {"status": reply.status_code}
