"""Validate a bundle held in memory (manifest bytes + safetensors bytes) and decode it to `PromptTensors`.

Order (each step its own error type, each message saying how to fix it): size cap on the raw bytes (checked
first, so nothing big is parsed), manifest JSON + format version, schema, fingerprint against the served
`spec` (skipped when `spec` is None: then shapes are checked against the spec the manifest embeds),
safetensors container, tensor names / shapes / dtype (against `m2pt.prompts.expected_shapes` and the
manifest), token limits, finite values and magnitude, sha256 of every tensor and the content hash, and the
size cap on the decoded fp32 tensors. The file-set check happens in `prompts_store.format` before the bytes
are read. Nothing here touches the filesystem or keeps partial results: a failure raises, and the caller has
nothing to clean up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from m2pt.prompts import PromptTensors, expected_shapes
from m2pt.spec import ModelSpec
from prompts_store.errors import (
    BundleDtypeError,
    BundleFingerprintError,
    BundleHashError,
    BundleNonFiniteError,
    BundleNotSafetensorsError,
    BundleShapeError,
    BundleTokenLimitError,
    BundleTooLargeError,
)
from prompts_store.limits import DEFAULT_LIMITS, BundleLimits
from prompts_store.manifest import DTYPE_CODES, Manifest, manifest_content_hash, parse_manifest
from prompts_store.st_header import SafetensorsHeader, parse_header, tensor_sha256


@dataclass
class LoadedBundle:
    """A fully validated bundle. `prompts` are CPU fp32; `nbytes` is their size in memory (what a cache
    holds)."""

    manifest: Manifest
    prompts: PromptTensors
    content_hash: str
    nbytes: int

    @property
    def label(self) -> str:
        return self.manifest.label


def check_raw_sizes(manifest_len: int, tensors_len: int, limits: BundleLimits) -> None:
    """Size cap on the raw files / upload, before anything is parsed."""
    total = manifest_len + tensors_len
    if total > limits.max_bytes:
        raise BundleTooLargeError(
            f"bundle is {total} bytes, over the {limits.max_bytes}-byte cap; use fewer prompt tokens, drop "
            "the projector, or raise the server's bundle size limit"
        )


def _spec_diff(a: ModelSpec, b: ModelSpec) -> str:
    fa, fb = a.fingerprint_fields(), b.fingerprint_fields()
    diffs = [f"{k} {fa[k]!r} vs {fb.get(k)!r}" for k in sorted(fa) if fa[k] != fb.get(k)]
    return ", ".join(diffs[:4]) or "no field differs"


def check_fingerprint(manifest: Manifest, spec: ModelSpec | None) -> ModelSpec:
    """Return the spec to check shapes against: the served one, or the manifest's own when `spec` is None."""
    if spec is None:
        return manifest.model_spec()
    expected = spec.fingerprint()
    if manifest.base_model.fingerprint != expected:
        raise BundleFingerprintError(
            f"bundle {manifest.label} was trained for base model {manifest.base_model.model_id!r} "
            f"({manifest.base_model.fingerprint}), but this server runs {spec.model_id!r} with fingerprint "
            f"{expected} (differs in: {_spec_diff(manifest.model_spec(), spec)}); train and export the "
            f"bundle against {spec.model_id!r}"
        )
    return spec


def _check_names(have: set[str], want: set[str], where: str, fix: str) -> None:
    if have != want:
        missing, extra = sorted(want - have), sorted(have - want)
        raise BundleShapeError(f"{where}: missing tensors {missing}, unexpected tensors {extra}; {fix}")


def check_shapes(manifest: Manifest, header: SafetensorsHeader, spec: ModelSpec) -> None:
    """Tensor names, shapes and dtype must match the base model (`expected_shapes`), the manifest and the
    file."""
    m = manifest
    fix = "re-export the bundle with save_bundle against this base model"
    expected = expected_shapes(spec, m.text_prompts, m.visual_prompts, m.has_projector)
    if not expected:
        raise BundleShapeError(
            "bundle holds no prompts (text_prompts = visual_prompts = 0, no projector); " + fix
        )
    _check_names(set(m.tensors), set(expected), f"manifest of {m.label} vs base model {spec.model_id!r}", fix)
    _check_names(set(header.tensors), set(m.tensors), "tensors file vs manifest", fix)
    if m.dtype not in DTYPE_CODES:
        raise BundleDtypeError(
            f"bundle dtype {m.dtype!r} is not supported; use one of {sorted(DTYPE_CODES)} (save_bundle "
            "writes float32)"
        )
    for name, shape in expected.items():
        info, entry = m.tensors[name], header.tensors[name]
        if info.dtype != m.dtype or entry.dtype != DTYPE_CODES[m.dtype]:
            raise BundleDtypeError(
                f"tensor {name!r} is {entry.dtype} in the file and {info.dtype!r} in the manifest, but the "
                f"bundle dtype is {m.dtype!r}; store every tensor as {m.dtype} (save_bundle writes float32)"
            )
        if tuple(info.shape) != tuple(shape) or entry.shape != tuple(shape):
            raise BundleShapeError(
                f"tensor {name!r} has shape {list(entry.shape)} in the file and {info.shape} in the "
                f"manifest, but base model {spec.model_id!r} needs {list(shape)}; {fix}"
            )


def check_token_limits(manifest: Manifest, limits: BundleLimits) -> None:
    for what, have, cap in (
        ("text", manifest.text_prompts, limits.max_text_tokens),
        ("visual", manifest.visual_prompts, limits.max_visual_tokens),
    ):
        if have > cap:
            raise BundleTokenLimitError(
                f"bundle {manifest.label} has {have} {what} prompt tokens per layer; this server allows at "
                f"most {cap}. Retrain with fewer {what} prompt tokens or raise the limit "
                f"(--max-{what}-tokens)"
            )


def load_tensors(tensor_bytes: bytes) -> dict[str, Tensor]:
    """Decode an already structure-checked safetensors buffer (never pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(tensor_bytes)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise BundleNotSafetensorsError(
            f"tensors file could not be decoded ({exc}); re-export the bundle"
        ) from None


def check_finite(flat: dict[str, Tensor], limits: BundleLimits) -> None:
    for name in sorted(flat):
        t = flat[name].to(torch.float32)
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise BundleNonFiniteError(
                f"tensor {name!r} holds {bad} NaN/Inf values; training diverged: retrain with a lower "
                "learning rate or export an earlier checkpoint"
            )
        peak = float(t.abs().max()) if t.numel() else 0.0
        if peak > limits.max_abs_value:
            raise BundleNonFiniteError(
                f"tensor {name!r} holds a value of magnitude {peak:.3g}, over the cap of "
                f"{limits.max_abs_value:g}; such values overflow half-precision serving: retrain with a "
                "lower learning rate"
            )


def check_hashes(manifest: Manifest, tensor_bytes: bytes, header: SafetensorsHeader) -> None:
    actual = tensor_sha256(tensor_bytes, header)
    for name in sorted(actual):
        if actual[name] != manifest.tensors[name].sha256:
            raise BundleHashError(
                f"tensor {name!r} has sha256 {actual[name][:16]}..., the manifest says "
                f"{manifest.tensors[name].sha256[:16]}...; the files were changed or corrupted: re-export or "
                "re-upload"
            )
    recomputed = manifest_content_hash(manifest)
    if recomputed != manifest.content_hash:
        raise BundleHashError(
            f"manifest content_hash {manifest.content_hash} does not match its fields ({recomputed}); "
            "the manifest was edited: re-export the bundle"
        )


def to_prompts(flat: dict[str, Tensor], limits: BundleLimits) -> tuple[PromptTensors, int]:
    fp32 = {k: v.to(torch.float32).contiguous() for k, v in flat.items()}
    nbytes = sum(t.numel() * t.element_size() for t in fp32.values())
    if nbytes > limits.max_bytes:
        raise BundleTooLargeError(
            f"bundle decodes to {nbytes} bytes of float32 tensors, over the {limits.max_bytes}-byte cap; "
            "use fewer prompt tokens or raise the server's bundle size limit"
        )
    return PromptTensors.from_flat(fp32), nbytes


def validate_bytes(
    manifest_bytes: bytes, tensor_bytes: bytes, spec: ModelSpec | None, limits: BundleLimits = DEFAULT_LIMITS
) -> LoadedBundle:
    """Validate a bundle given as bytes; return it decoded, or raise the first `BundleError` in the order
    above."""
    check_raw_sizes(len(manifest_bytes), len(tensor_bytes), limits)
    manifest = parse_manifest(manifest_bytes, limits)
    target = check_fingerprint(manifest, spec)
    header = parse_header(tensor_bytes, limits.max_header_bytes)
    check_shapes(manifest, header, target)
    check_token_limits(manifest, limits)
    flat = load_tensors(tensor_bytes)
    check_finite(flat, limits)
    check_hashes(manifest, tensor_bytes, header)
    prompts, nbytes = to_prompts(flat, limits)
    return LoadedBundle(manifest=manifest, prompts=prompts, content_hash=manifest.content_hash, nbytes=nbytes)
