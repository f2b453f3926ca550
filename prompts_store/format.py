"""Bundle format v1 on disk: a directory holding exactly `manifest.json` and `tensors.safetensors`.

- `save_bundle` writes fp32 tensors and a manifest (see `prompts_store.manifest` for its fields), validating
  the result against `spec` before anything is written, through a temp directory + fsync + rename, so
  `out_dir` holds either nothing new or a complete bundle.
- `read_manifest` parses only the manifest (cheap; for listings).
- `load_bundle` checks the file set and the file sizes, then reads the bytes and runs the full validation of
  `prompts_store.validate`. `validate_upload` runs the same validation on bytes already in memory (HTTP
  uploads).

Symlinks inside a bundle directory are refused. This module knows nothing about names@versions or stores;
`prompts_store.store` does.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from m2pt.prompts import PromptTensors
from m2pt.spec import ModelSpec
from prompts_store.atomic import fsync_dir, read_capped, remove_tree, tmp_sibling, write_durable
from prompts_store.errors import BundleFileSetError, BundleManifestError, BundleTooLargeError
from prompts_store.limits import DEFAULT_LIMITS, BundleLimits
from prompts_store.manifest import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    TENSORS_FILE,
    BaseModelInfo,
    Manifest,
    TensorInfo,
    compute_content_hash,
    parse_manifest,
    utc_now_iso,
)
from prompts_store.names import validate_name, validate_version
from prompts_store.st_header import parse_header, tensor_sha256
from prompts_store.validate import LoadedBundle, check_raw_sizes, validate_bytes

__all__ = [
    "BundleLimits",
    "LoadedBundle",
    "Manifest",
    "MANIFEST_FILE",
    "TENSORS_FILE",
    "load_bundle",
    "read_bundle_bytes",
    "read_manifest",
    "save_bundle",
    "validate_upload",
    "write_bundle_dir",
]

log = logging.getLogger(__name__)
BUNDLE_FILES = frozenset({MANIFEST_FILE, TENSORS_FILE})
# save_bundle checks what it writes with the serving checks but not the serving caps (a server may allow more)
_SAVE_LIMITS = BundleLimits(max_text_tokens=1 << 30, max_visual_tokens=1 << 30, max_bytes=1 << 62)


def _json_provenance(provenance: dict[str, Any] | None) -> dict[str, Any]:
    try:
        out = json.loads(json.dumps(provenance or {}, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise BundleManifestError(
            f"provenance must be plain JSON (dict/list/str/finite numbers): {exc}"
        ) from None
    if not isinstance(out, dict):
        raise BundleManifestError("provenance must be a JSON object (a dict)")
    return out


def encode_bundle(
    prompts: PromptTensors, spec: ModelSpec, name: str, version: str | None, provenance: dict[str, Any] | None
) -> tuple[bytes, bytes]:
    """(manifest bytes, safetensors bytes) of a format-v1 bundle; tensors are stored as float32."""
    from safetensors.torch import save

    validate_name(name)
    if version is not None:
        validate_version(version)
    flat = {k: v.to(torch.float32).contiguous() for k, v in prompts.to_flat().items()}
    tensor_bytes = save(flat, metadata={"format": "pt"})
    header = parse_header(tensor_bytes, _SAVE_LIMITS.max_header_bytes)
    hashes = tensor_sha256(tensor_bytes, header)
    tensors = {k: TensorInfo(shape=list(v.shape), dtype="float32", sha256=hashes[k]) for k, v in flat.items()}
    has_projector = bool(prompts.projector)
    fingerprint = spec.fingerprint()
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=name,
        version=version,
        created_at=utc_now_iso(),
        base_model=BaseModelInfo(model_id=spec.model_id, fingerprint=fingerprint, spec=spec.to_json()),
        text_prompts=prompts.text_len,
        visual_prompts=prompts.visual_len,
        tensors=tensors,
        dtype="float32",
        has_projector=has_projector,
        provenance=_json_provenance(provenance),
        content_hash=compute_content_hash(
            fingerprint, prompts.text_len, prompts.visual_len, "float32", has_projector, tensors
        ),
    )
    return manifest.to_bytes(), tensor_bytes


def write_bundle_dir(directory: Path, manifest_bytes: bytes, tensor_bytes: bytes) -> None:
    """Create `directory` (must not exist) with both files written and fsynced, manifest last, dir fsynced."""
    os.mkdir(directory)
    write_durable(directory / TENSORS_FILE, tensor_bytes)
    write_durable(directory / MANIFEST_FILE, manifest_bytes)
    fsync_dir(directory)


def _install(tmp: Path, out_dir: Path) -> None:
    """Move the complete bundle `tmp` to `out_dir`: a missing or empty `out_dir`, or one holding an old
    bundle."""
    if out_dir.is_dir() and not out_dir.is_symlink() and set(os.listdir(out_dir)) == BUNDLE_FILES:
        trash = tmp_sibling(out_dir)
        os.rename(out_dir, trash)
        os.rename(tmp, out_dir)
        remove_tree(trash)
    else:
        os.rename(tmp, out_dir)  # atomic; replaces an empty directory, fails on a non-empty one
    fsync_dir(out_dir.parent)


def save_bundle(
    out_dir: str | os.PathLike[str],
    prompts: PromptTensors,
    spec: ModelSpec,
    name: str,
    version: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write `prompts` as a bundle for base model `spec` into `out_dir` and return its path.

    `out_dir` may be missing, empty, or hold a previous bundle (replaced whole); anything else is refused.
    Raises the `BundleError` validation would raise on load (wrong shapes for `spec`, NaN, ...) before
    writing.
    """
    out_dir = Path(out_dir)
    manifest_bytes, tensor_bytes = encode_bundle(prompts, spec, name, version, provenance)
    validate_bytes(manifest_bytes, tensor_bytes, spec, _SAVE_LIMITS)
    if out_dir.exists() and (not out_dir.is_dir() or set(os.listdir(out_dir)) - BUNDLE_FILES):
        raise BundleFileSetError(
            f"{out_dir} exists and is not an empty or bundle directory; choose a new directory"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(out_dir)
    try:
        write_bundle_dir(tmp, manifest_bytes, tensor_bytes)
        _install(tmp, out_dir)
    except OSError:
        remove_tree(tmp)
        raise
    log.info("saved bundle %s (%d tensor bytes) to %s", name, len(tensor_bytes), out_dir)
    return out_dir


def _check_file_set(directory: Path) -> None:
    if not directory.is_dir() or directory.is_symlink():
        raise BundleFileSetError(
            f"{directory} is not a bundle directory; pass the directory holding {MANIFEST_FILE} "
            f"and {TENSORS_FILE}"
        )
    present = set(os.listdir(directory))
    missing, extra = sorted(BUNDLE_FILES - present), sorted(present - BUNDLE_FILES)
    links = sorted(
        f for f in BUNDLE_FILES & present if not (directory / f).is_file() or (directory / f).is_symlink()
    )
    if missing or extra or links:
        raise BundleFileSetError(
            f"{directory} must hold exactly {MANIFEST_FILE} and {TENSORS_FILE} as regular files "
            f"(missing: {missing}, unexpected: {extra}, not regular files: {links}); re-export the bundle"
        )


def read_bundle_bytes(
    directory: str | os.PathLike[str], limits: BundleLimits = DEFAULT_LIMITS
) -> tuple[bytes, bytes]:
    """File-set check, size caps from the file sizes, then (manifest bytes, tensor bytes)."""
    directory = Path(directory)
    _check_file_set(directory)
    msize = (directory / MANIFEST_FILE).stat().st_size
    tsize = (directory / TENSORS_FILE).stat().st_size
    check_raw_sizes(msize, tsize, limits)
    manifest_bytes = read_capped(directory / MANIFEST_FILE, limits.max_bytes)
    tensor_bytes = read_capped(directory / TENSORS_FILE, limits.max_bytes)
    if manifest_bytes is None or tensor_bytes is None:
        raise BundleTooLargeError(f"{directory} grew past the {limits.max_bytes}-byte cap while being read")
    return manifest_bytes, tensor_bytes


def read_manifest(directory: str | os.PathLike[str], limits: BundleLimits = DEFAULT_LIMITS) -> Manifest:
    """Parse `manifest.json` of a bundle directory (no tensor is read)."""
    directory = Path(directory)
    _check_file_set(directory)
    data = read_capped(directory / MANIFEST_FILE, limits.max_manifest_bytes)
    if data is None:
        raise BundleManifestError(
            f"{directory / MANIFEST_FILE} is over the {limits.max_manifest_bytes}-byte cap"
        )
    return parse_manifest(data, limits)


def load_bundle(
    directory: str | os.PathLike[str], spec: ModelSpec | None = None, limits: BundleLimits = DEFAULT_LIMITS
) -> LoadedBundle:
    """Validate and load a bundle directory (see `prompts_store.validate` for the order of checks)."""
    manifest_bytes, tensor_bytes = read_bundle_bytes(directory, limits)
    return validate_bytes(manifest_bytes, tensor_bytes, spec, limits)


def validate_upload(
    manifest_bytes: bytes, tensor_bytes: bytes, spec: ModelSpec | None, limits: BundleLimits = DEFAULT_LIMITS
) -> LoadedBundle:
    """Validate an uploaded bundle entirely in memory; nothing is written anywhere."""
    return validate_bytes(manifest_bytes, tensor_bytes, spec, limits)
