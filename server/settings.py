"""Every knob of one server instance, validated once at startup.

`Settings` is a strict pydantic model: a wrong type, an out-of-range number or an unknown field raises
`pydantic.ValidationError` when the settings are built (the CLI turns that into a one-line message and exit
code 2). `check_paths()` is the extra startup check that needs the filesystem (the model and store locations);
it is called when the real engine is built, not for API tests that inject their own engine.

Secrets (`api_key`, `ops_token`) default to the environment variables `M2PT_API_KEY` and `M2PT_OPS_TOKEN` and
are held as `SecretStr`, so they never appear in logs or reprs. There are deliberately no CLI flags for them
(a flag would show in `ps`).

Binding: `host` defaults to 127.0.0.1 (nothing outside the machine can reach a fresh install). A container
needs `--host 0.0.0.0`, which the Dockerfile passes explicitly.

This module does not load models, open stores or read request data.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from prompts_store.limits import BundleLimits

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL_DIR = REPO_ROOT / "demo" / "base"
DEMO_STORE_DIR = REPO_ROOT / "demo" / "bundles"

MiB = 1024 * 1024
# A Hugging Face hub id: "name" or "org/name" of letters, digits, '.', '_' and '-'.
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class SettingsError(ValueError):
    """A setting that is well-typed but unusable on this machine (a missing model directory, say)."""


def _user_store() -> Path:
    from prompts_store.layered import user_store_dir

    return user_store_dir()


def _env_secret(name: str) -> SecretStr | None:
    value = os.environ.get(name, "")
    return SecretStr(value) if value else None


class Settings(BaseModel):
    """Configuration of `m2pt serve`. Field descriptions are the user documentation (`m2pt serve --help`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)

    # Where the model and bundles come from.
    model: str = Field(
        str(DEMO_MODEL_DIR),
        description="base checkpoint of a supported family (see the README): local directory or HF hub id",
    )
    store: Path = Field(
        default_factory=_user_store,
        description="writable bundle store, where uploads go (created if missing; default $M2PT_STORE, else "
        "$M2PT_HOME/bundles, M2PT_HOME defaulting to ~/.local/share/m2pt)",
    )
    demo_store: Path | None = Field(
        None,
        description="read-only bundle store served beside --store (default: the shipped demo bundles when "
        "serving the shipped demo model, else none)",
    )

    # Network.
    host: str = Field("127.0.0.1", min_length=1, description="address to bind; 0.0.0.0 in containers")
    port: int = Field(8000, ge=1, le=65535, description="TCP port")
    shutdown_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="on SIGTERM, how long requests in flight may run before they are cut",
    )

    # Device.
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when present")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU"
    )

    # Engine limits.
    max_batch_size: int = Field(16, ge=1, le=1024, description="rows in the running decode batch")
    max_queue: int = Field(64, ge=1, le=100_000, description="waiting requests before 429")
    max_bundles_per_batch: int | None = Field(
        None, ge=1, description="distinct bundles per decode step (None = unlimited; 1 = one bundle per step)"
    )
    max_num_batched_tokens: int = Field(
        128,
        ge=1,
        le=1_000_000,
        description="per-step token budget shared by decode rows (1 each) and prompt chunks / image encodes "
        "(raised to max_batch_size if lower; sized for CPU, raise it on a GPU)",
    )
    max_resident_bundles: int = Field(
        32, ge=1, le=100_000, description="bundle prefixes kept on the device (LRU)"
    )
    image_cache_size: int = Field(
        256, ge=0, le=1_000_000, description="image-feature cache entries (0 = off)"
    )
    request_timeout_s: float = Field(120.0, gt=0, le=86_400, description="end-to-end limit of one request")

    # Request limits.
    max_tokens_limit: int = Field(512, ge=1, le=1_000_000, description="largest max_tokens a request may ask")
    default_max_tokens: int | None = Field(
        None, ge=1, description="max_tokens when a request does not say (None: min(64, max_tokens_limit))"
    )
    max_instruction_chars: int = Field(
        8192, ge=1, le=10_000_000, description="longest instruction / message text"
    )
    max_messages: int = Field(64, ge=1, le=10_000, description="most messages in one OpenAI request")
    max_images_per_request: int = Field(1, ge=1, le=64, description="most images in one request")
    max_stop_strings: int = Field(8, ge=0, le=64, description="most stop strings in one request")
    max_body_bytes: int = Field(16 * MiB, ge=1024, description="largest request body (413 beyond)")

    # Images.
    max_image_pixels: int = Field(16_000_000, ge=1, description="width × height cap, checked before decoding")
    max_image_side: int = Field(4096, ge=1, description="cap on the longer side in pixels")
    max_image_aspect_ratio: float = Field(20.0, ge=1, description="cap on long side / short side")
    allow_remote_images: bool = Field(False, description="fetch http(s) image URLs (off: refused with 400)")
    remote_image_domains: tuple[str, ...] = Field(
        (), description="hosts remote images may come from (required)"
    )
    remote_image_allow_private: bool = Field(
        False, description="allow private/loopback addresses of those hosts"
    )
    remote_image_timeout_s: float = Field(5.0, gt=0, le=120, description="time limit of one image fetch")
    remote_image_max_bytes: int = Field(8 * MiB, ge=1, description="size cap of one fetched image")

    # Bundles (uploads and loads).
    max_bundle_bytes: int = Field(256 * MiB, ge=1024, description="size cap of an uploaded tensors file")
    max_manifest_bytes: int = Field(
        64 * 1024, ge=256, le=16 * MiB, description="size cap of an uploaded manifest"
    )
    max_text_tokens: int = Field(
        64, ge=1, le=100_000, description="most textual prompt tokens per LLM layer a bundle may have"
    )
    max_visual_tokens: int = Field(
        64, ge=1, le=100_000, description="most visual prompt tokens per ViT layer a bundle may have"
    )

    # Auth (from the environment by default).
    api_key: SecretStr | None = Field(
        default_factory=lambda: _env_secret("M2PT_API_KEY"),
        validate_default=True,
        description="chat routes need it when set",
    )
    ops_token: SecretStr | None = Field(
        default_factory=lambda: _env_secret("M2PT_OPS_TOKEN"),
        validate_default=True,
        description="ops routes need it; unset = ops off",
    )

    @field_validator("model")
    @classmethod
    def _model_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model must be a local directory or a Hugging Face hub id, not empty")
        return value

    @field_validator("api_key", "ops_token")
    @classmethod
    def _secret_strength(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 8:
            raise ValueError("tokens must be at least 8 characters long")
        return value

    @field_validator("remote_image_domains")
    @classmethod
    def _domains_lowercase(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(d.strip().lower().rstrip(".") for d in value if d.strip())

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_max_tokens is not None and self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds "
                f"max_tokens_limit ({self.max_tokens_limit})"
            )
        if self.allow_remote_images and not self.remote_image_domains:
            raise ValueError(
                "allow_remote_images needs remote_image_domains: the hosts images may be fetched from"
            )
        return self

    @property
    def effective_default_max_tokens(self) -> int:
        """max_tokens of a request that does not say."""
        return (
            self.default_max_tokens if self.default_max_tokens is not None else min(64, self.max_tokens_limit)
        )

    @property
    def max_upload_bytes(self) -> int:
        """Body cap of `POST /v1/bundles`: both files plus room for the multipart framing."""
        return self.max_bundle_bytes + self.max_manifest_bytes + 64 * 1024

    def bundle_limits(self) -> BundleLimits:
        """The caps every uploaded or loaded bundle must meet (the store's `BundleLimits`)."""
        return BundleLimits(
            max_text_tokens=self.max_text_tokens,
            max_visual_tokens=self.max_visual_tokens,
            max_bytes=self.max_bundle_bytes + self.max_manifest_bytes,
            max_manifest_bytes=self.max_manifest_bytes,
        )

    @property
    def read_only_stores(self) -> list[Path]:
        """The read-only stores served behind `store`: `demo_store`, else the demo bundles for the demo
        model."""
        if self.demo_store is not None:
            return [self.demo_store.expanduser()]
        model_path = Path(self.model).expanduser()
        is_demo = model_path.is_dir() and model_path.resolve() == DEMO_MODEL_DIR.resolve()
        return [DEMO_STORE_DIR] if is_demo else []

    def check_paths(self) -> None:
        """Startup check of the filesystem side: the model must be an existing directory or look like a hub
        id, and the store location must be a directory (or creatable). Raises `SettingsError` with the fix."""
        model_path = Path(self.model).expanduser()
        if model_path.exists():
            if not model_path.is_dir():
                raise SettingsError(f"--model {self.model!r} is a file; pass the checkpoint directory")
        elif model_path.is_absolute() or self.model.startswith(".") or not _HF_ID.match(self.model):
            hint = (
                " (the shipped demo model is missing: build it as the README says)"
                if model_path == DEMO_MODEL_DIR
                else ""
            )
            raise SettingsError(
                f"--model {self.model!r}: no such directory and not a Hugging Face hub id{hint}"
            )
        store = self.store.expanduser()
        if store.exists() and not store.is_dir():
            raise SettingsError(f"--store {str(store)!r} exists and is not a directory")
        if self.demo_store is not None and not self.demo_store.expanduser().is_dir():
            raise SettingsError(f"--demo-store {str(self.demo_store)!r} is not a directory")
