"""What a prompt bundle must know about the frozen base model: sizes, layer counts and a fingerprint.

`ModelSpec` is plain data (no torch), so the bundle store and the server's scheduler can use it without a model.
It does not load anything; `m2pt.loading.load_frozen_llava` builds one from a loaded model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts of a LLaVA-style base that prompt tensors depend on.

    Contract: two models with equal `fingerprint()` accept the same bundles (same tensor shapes, same token ids).
    """

    model_id: str
    vit_layers: int
    vit_dim: int
    vit_heads: int
    llm_layers: int
    llm_dim: int
    llm_heads: int
    llm_kv_heads: int
    llm_head_dim: int
    vocab_size: int
    image_token_id: int
    image_size: int
    patch_size: int
    num_image_tokens: int  # per image (any-res families: per tile, before packing; images vary)
    projector_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    family: str = "llava"  # the `ModelFamily.name` that reads bundles for this base
    extras: dict[str, Any] = field(default_factory=dict)  # family-specific compatibility facts (JSON values)

    def fingerprint_fields(self) -> dict[str, Any]:
        """The config fields that decide bundle compatibility (everything except the display name).

        `family` and `extras` enter only when they differ from their defaults, so the fingerprint of a plain
        LLaVA base is the one it had before families existed (bundles made then still load)."""
        fields = asdict(self)
        fields.pop("model_id")
        if fields["family"] == "llava":
            fields.pop("family")
        if not fields["extras"]:
            fields.pop("extras")
        fields["projector_shapes"] = {k: list(v) for k, v in sorted(self.projector_shapes.items())}
        return fields

    def fingerprint(self) -> str:
        """`sha256:<hex>` of the compatibility fields, stable across processes and versions of this code."""
        blob = json.dumps(self.fingerprint_fields(), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()

    def text_prompt_shape(self, num_tokens: int) -> tuple[int, int, int]:
        return (self.llm_layers, num_tokens, self.llm_dim)

    def visual_prompt_shape(self, num_tokens: int) -> tuple[int, int, int]:
        return (self.vit_layers, num_tokens, self.vit_dim)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["projector_shapes"] = {k: list(v) for k, v in self.projector_shapes.items()}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        data["projector_shapes"] = {k: tuple(v) for k, v in data.get("projector_shapes", {}).items()}
        return cls(**data)
