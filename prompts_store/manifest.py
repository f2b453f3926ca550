"""The bundle manifest (format v1): schema, strict parsing from bytes, serialisation and the content hash.

`manifest.json` records `format_version` (1), `name`, `version`, `created_at`, `base_model` {`model_id`,
`fingerprint`, `spec`}, `text_prompts` / `visual_prompts` (prompt lengths Lt / Lv), `tensors` {name: {`shape`,
`dtype`, `sha256`}}, `dtype`, `has_projector`, `provenance` (free-form JSON: dataset, steps, metrics, ...) and
`content_hash`.

`content_hash` covers the tensors' hashes, shapes and dtypes plus the compatibility fields (format version,
base-model fingerprint, prompt lengths, dtype, projector flag) and nothing else, so equal content gives an
equal hash whatever the name, version, date or provenance; caches key on it. Parsing refuses oversized, too
deep, duplicate-key or non-JSON input, unknown keys and wrong types. This module does not look at tensor
bytes; `prompts_store.validate` does.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from m2pt.spec import ModelSpec
from prompts_store.errors import BundleFormatVersionError, BundleManifestError
from prompts_store.limits import DEFAULT_LIMITS, BundleLimits
from prompts_store.names import validate_name, validate_version

FORMAT_VERSION: Final = 1
MANIFEST_FILE = "manifest.json"
TENSORS_FILE = "tensors.safetensors"
# manifest dtype name -> safetensors dtype code; bundles hold floats only
DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
# dtype names are free strings here so that an unsupported one (float64, int8) is reported as a dtype error by
# `prompts_store.validate`, in its place in the validation order, rather than as a schema error
DtypeName = Annotated[str, Field(max_length=16)]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
PrefixedSha256 = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]


class TensorInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=8)]
    dtype: DtypeName
    sha256: Sha256Hex


class BaseModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    model_id: Annotated[str, Field(max_length=1024)]
    fingerprint: PrefixedSha256
    spec: dict[str, Any]  # ModelSpec.to_json()


class Manifest(BaseModel):
    """A parsed, schema-valid manifest. Consistency with the tensors file is checked by
    `prompts_store.validate`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    format_version: Literal[1]
    name: str
    version: str | None
    created_at: str
    base_model: BaseModelInfo
    text_prompts: Annotated[int, Field(ge=0)]
    visual_prompts: Annotated[int, Field(ge=0)]
    tensors: dict[str, TensorInfo]
    dtype: DtypeName
    has_projector: bool
    provenance: dict[str, Any]
    content_hash: PrefixedSha256

    @property
    def label(self) -> str:
        """`name@version`, or just `name` for a bundle not yet published to a store."""
        return f"{self.name}@{self.version}" if self.version else self.name

    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_json(self.base_model.spec)

    def to_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(), indent=2, sort_keys=True) + "\n").encode("utf-8")


def compute_content_hash(
    fingerprint: str,
    text_prompts: int,
    visual_prompts: int,
    dtype: str,
    has_projector: bool,
    tensors: dict[str, TensorInfo],
) -> str:
    """`sha256:<hex>` of the canonical JSON of the compatibility fields and every tensor's shape, dtype and
    sha256."""
    blob = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "text_prompts": text_prompts,
        "visual_prompts": visual_prompts,
        "dtype": dtype,
        "has_projector": has_projector,
        "tensors": {k: v.model_dump() for k, v in sorted(tensors.items())},
    }
    text = json.dumps(blob, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def manifest_content_hash(manifest: Manifest) -> str:
    """The content hash recomputed from a manifest's own fields (compare with `manifest.content_hash`)."""
    m = manifest
    return compute_content_hash(
        m.base_model.fingerprint, m.text_prompts, m.visual_prompts, m.dtype, m.has_projector, m.tensors
    )


def utc_now_iso() -> str:
    return datetime.now().astimezone().replace(microsecond=0).isoformat()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, computed without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _load_json(data: bytes, limits: BundleLimits) -> dict[str, Any]:
    if len(data) > limits.max_manifest_bytes:
        raise BundleManifestError(
            f"manifest.json is {len(data)} bytes, over the {limits.max_manifest_bytes}-byte cap; "
            "keep provenance small (put large logs elsewhere and reference them)"
        )
    try:
        raw = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        reason = str(exc) if isinstance(exc, ValueError) else type(exc).__name__
        raise BundleManifestError(
            f"manifest.json is not valid UTF-8 JSON ({reason[:120]}); re-export the bundle"
        ) from None
    if not isinstance(raw, dict):
        raise BundleManifestError("manifest.json must hold a JSON object; re-export the bundle")
    if _depth(raw) > limits.max_manifest_depth:
        raise BundleManifestError(
            f"manifest.json nests deeper than {limits.max_manifest_depth} levels; flatten the provenance"
        )
    return raw


def _check_version_field(raw: dict[str, Any]) -> None:
    version = raw.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise BundleFormatVersionError(
            f"manifest format_version is {version!r}; this server reads format_version {FORMAT_VERSION}. "
            "Re-export the bundle with this version of m2pt"
        )


def _schema_error(exc: ValidationError) -> BundleManifestError:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:4]]
    more = f" (+{exc.error_count() - 4} more)" if exc.error_count() > 4 else ""
    return BundleManifestError(
        f"manifest.json does not match format v1: {'; '.join(parts)}{more}; re-export the bundle"
    )


def _check_semantics(m: Manifest) -> None:
    validate_name(m.name, what="manifest name")
    if m.version is not None:
        validate_version(m.version)
    try:
        datetime.fromisoformat(m.created_at)
    except ValueError:
        raise BundleManifestError(
            f"manifest created_at {m.created_at[:40]!r} is not an ISO 8601 time"
        ) from None
    try:
        spec = m.model_spec()
    except (TypeError, ValueError, AttributeError) as exc:
        raise BundleManifestError(
            f"manifest base_model.spec is not a model spec ({exc}); re-export the bundle"
        ) from None
    if spec.fingerprint() != m.base_model.fingerprint:
        raise BundleManifestError(
            "manifest base_model.spec does not hash to base_model.fingerprint (edited by hand?); "
            "re-export the bundle"
        )


def parse_manifest(data: bytes, limits: BundleLimits = DEFAULT_LIMITS) -> Manifest:
    """Bytes -> `Manifest`. Raises `BundleManifestError` / `BundleFormatVersionError` / `BundleNameError`."""
    raw = _load_json(data, limits)
    _check_version_field(raw)
    try:
        manifest = Manifest.model_validate(raw, strict=True)
    except ValidationError as exc:
        raise _schema_error(exc) from None
    _check_semantics(manifest)
    return manifest
