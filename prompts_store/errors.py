"""Errors of the bundle format and store: one type per failure, each with an HTTP status and a stable
`error_type`.

Every message says what is wrong AND how to fix it. The HTTP layer turns any `BundleError` into
`{"error": {"type": err.error_type, "message": str(err)}}` with status `err.status`; the CLI prints the
message and exits 1. Every message is bounded: one longer than `MAX_MESSAGE_CHARS` is cut (quoted client
content inside it is cut shorter where it is built). Messages raised by `prompts_store.store` name bundles
(`name@version`), never a filesystem path. This module only defines the types; it raises nothing itself.
"""

from __future__ import annotations

MAX_MESSAGE_CHARS = 1000


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message`, cut to at most `limit` characters (with a marker saying so)."""
    if len(message) <= limit:
        return message
    marker = " ... (message truncated)"
    return message[: limit - len(marker)] + marker


class BundleError(Exception):
    """Base class. `status` is the HTTP status, `error_type` the machine-readable type (never changes)."""

    status = 400
    error_type = "bundle_error"

    def __init__(self, message: str = "") -> None:
        super().__init__(bounded(str(message)))


class BundleFileSetError(BundleError):
    """The bundle directory does not hold exactly `manifest.json` and `tensors.safetensors`."""

    status = 400
    error_type = "bundle_file_set"


class BundleFormatVersionError(BundleError):
    """The manifest's `format_version` is missing or not one this code reads."""

    status = 422
    error_type = "bundle_format_version"


class BundleManifestError(BundleError):
    """The manifest is not JSON, is too big or too deep, or misses / mistypes fields."""

    status = 400
    error_type = "bundle_manifest"


class BundleNotSafetensorsError(BundleError):
    """The tensors file is not a well-formed safetensors file (a pickle, truncated bytes, an oversized
    header...)."""

    status = 400
    error_type = "bundle_not_safetensors"


class BundleFingerprintError(BundleError):
    """The bundle was trained for another base model (fingerprint mismatch)."""

    status = 422
    error_type = "bundle_fingerprint"


class BundleShapeError(BundleError):
    """Tensor names or shapes do not match the base model or the manifest."""

    status = 422
    error_type = "bundle_shape"


class BundleDtypeError(BundleShapeError):
    """A tensor's dtype is not a supported float type or disagrees with the manifest."""

    status = 422
    error_type = "bundle_dtype"


class BundleTokenLimitError(BundleError):
    """More prompt tokens than the served limits allow."""

    status = 422
    error_type = "bundle_token_limit"


class BundleNonFiniteError(BundleError):
    """A tensor holds NaN, Inf, or values beyond the magnitude cap."""

    status = 422
    error_type = "bundle_non_finite"


class BundleHashError(BundleError):
    """A tensor's sha256 or the manifest's content hash does not match the bytes."""

    status = 422
    error_type = "bundle_hash"


class BundleTooLargeError(BundleError):
    """The bundle exceeds the size cap."""

    status = 413
    error_type = "bundle_too_large"


class BundleNotFoundError(BundleError):
    """No bundle (or version) with that name in the store."""

    status = 404
    error_type = "bundle_not_found"


class BundleNameError(BundleError):
    """A bundle name, version or `name@version` reference is not valid."""

    status = 400
    error_type = "bundle_name"


class BundleConflictError(BundleError):
    """The version being published already exists (versions are immutable)."""

    status = 409
    error_type = "bundle_conflict"


class BundleStoreError(BundleError):
    """The store directory itself is unusable (unreadable index, not a directory, ...)."""

    status = 500
    error_type = "bundle_store"


class BundleStoreFullError(BundleStoreError):
    """A publish failed because the store's disk (or quota) is full; nothing was published."""

    status = 507
    error_type = "bundle_store_full"
