"""Caps applied to every bundle that is loaded, validated or published. Plain data; enforcing them is
`validate`'s job.

Defaults fit a LLaVA-1.5-7B-shaped bundle with up to 64 text and 64 visual prompt tokens and a full MLP
projector (about 120 MB in fp32) with room to spare; the server may pass tighter or looser limits.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class BundleLimits:
    """`max_bytes` caps the files on disk / the upload (manifest + tensors) and the decoded fp32 tensors
    alike."""

    max_text_tokens: int = 64  # Lt: textual prompt tokens per LLM layer
    max_visual_tokens: int = 64  # Lv: visual prompt tokens per ViT layer
    max_bytes: int = 256 * MiB
    max_manifest_bytes: int = 64 * 1024
    max_manifest_depth: int = 16  # nesting depth of the manifest JSON (provenance is free-form)
    max_header_bytes: int = 1 * MiB  # safetensors JSON header (the library itself allows 100 MB)
    max_abs_value: float = 1.0e4  # finite but absurd magnitudes (1e30) overflow fp16/bf16 serving


DEFAULT_LIMITS = BundleLimits()  # immutable, so safe as a shared default argument
