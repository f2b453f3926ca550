"""Helpers for the prompts_store tests: real bundles for the tiny model, and hand-crafted bad ones whose
hashes are recomputed so that exactly the intended validation step fails."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save

from m2pt.prompts import PromptTensors, init_prompts
from m2pt.spec import ModelSpec
from prompts_store.manifest import TensorInfo, compute_content_hash
from prompts_store.st_header import parse_header, tensor_sha256


def tiny_prompts(
    tiny, seed: int = 0, text_len: int = 3, visual_len: int = 2, projector: bool = True
) -> PromptTensors:
    base = tiny.model.model.multi_modal_projector.state_dict() if projector else None
    prompts = init_prompts(tiny.spec, text_len, visual_len, base_projector=base, seed=seed)
    if prompts.projector:  # make the tuned projector differ per seed, like a trained one
        gen = torch.Generator().manual_seed(seed)
        prompts.projector = {
            k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in prompts.projector.items()
        }
    return prompts


def other_spec(spec: ModelSpec) -> ModelSpec:
    """A different base model (wider LLM), as another checkpoint would be."""
    data = spec.to_json()
    data.update(model_id="other-llava", llm_dim=spec.llm_dim * 2)
    return ModelSpec.from_json(data)


def read_files(bundle_dir: Path) -> tuple[dict, bytes]:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    return manifest, (bundle_dir / "tensors.safetensors").read_bytes()


def rehash(manifest: dict, tensor_bytes: bytes, dtype_names: dict[str, str] | None = None) -> dict:
    """Recompute per-tensor entries and the content hash of `manifest` from `tensor_bytes` (shapes, dtypes,
    sha256)."""
    codes = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8"}
    header = parse_header(tensor_bytes, 1 << 20)
    hashes = tensor_sha256(tensor_bytes, header)
    tensors = {
        k: {"shape": list(e.shape), "dtype": (dtype_names or {}).get(k, codes[e.dtype]), "sha256": hashes[k]}
        for k, e in header.tensors.items()
    }
    manifest = dict(manifest, tensors=tensors)
    infos = {k: TensorInfo.model_construct(**v) for k, v in tensors.items()}
    manifest["content_hash"] = compute_content_hash(
        manifest["base_model"]["fingerprint"],
        manifest["text_prompts"],
        manifest["visual_prompts"],
        manifest["dtype"],
        manifest["has_projector"],
        infos,
    )
    return manifest


def write_raw(bundle_dir: Path, manifest: dict | bytes, tensor_bytes: bytes) -> Path:
    os.makedirs(bundle_dir, exist_ok=True)
    data = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    (bundle_dir / "manifest.json").write_bytes(data)
    (bundle_dir / "tensors.safetensors").write_bytes(tensor_bytes)
    return bundle_dir


def craft(bundle_dir: Path, good_dir: Path, flat: dict[str, torch.Tensor], **manifest_updates) -> Path:
    """A bundle with tensors `flat` and the good bundle's manifest (plus updates), hashes made consistent."""
    manifest, _ = read_files(good_dir)
    manifest.update(manifest_updates)
    tensor_bytes = save(flat, metadata={"format": "pt"})
    return write_raw(bundle_dir, rehash(manifest, tensor_bytes), tensor_bytes)


def tree(root: Path) -> list[str]:
    """Every path under `root`, relative (to compare store states)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))
