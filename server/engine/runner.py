"""The model side of the engine: owns the frozen model, the running batch's `DecodeState`, and the image-feature
cache. All tensor work of serving happens here, through the core's one implementation (`m2pt.forward`).

Rows are identified by request id; `prefill` appends rows, `decode` advances every row by one token, `drop`
removes rows. Not thread-safe: only the engine loop thread calls it. It knows nothing about HTTP, queues or names.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from m2pt.families.base import ImageInput
from m2pt.forward import DecodeState, RowInput
from m2pt.loading import FrozenLlava
from m2pt.prefix import BundlePrefix

log = logging.getLogger(__name__)


@dataclass
class PreparedRow:
    """A request after tokenisation: what the model needs to prefill it."""

    request_id: str
    input_ids: Tensor  # [T] long, image placeholders expanded
    pixel_values: Tensor | None  # [n_images, 3, H, W] (plain LLaVA; other families use `images`)
    image_keys: list[str]  # content hash of each image
    prefix: BundlePrefix | None
    bundle_key: str  # bundle content hash, or "base"
    images: list[ImageInput] | None = (
        None  # one per image, from `family.split_images`; None: from pixel_values
    )

    def image_inputs(self) -> list[ImageInput]:
        if self.images is not None:
            return self.images
        return [] if self.pixel_values is None else [ImageInput(px) for px in self.pixel_values]


class ImageFeatureCache:
    """LRU of projected image features keyed by (image content hash, bundle content hash)."""

    def __init__(self, capacity: int, metrics=None) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self._metrics = metrics

    def get(self, key: tuple[str, str]) -> Tensor | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        if self._metrics is not None:
            (self._metrics.image_cache_hits if hit is not None else self._metrics.image_cache_misses).inc()
        return hit

    def put(self, key: tuple[str, str], features: Tensor) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = features
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


class ModelRunner:
    """Batched prefill/decode over rows that each carry their own bundle prefix (or none)."""

    def __init__(self, frozen: FrozenLlava, image_cache_size: int = 256, metrics=None) -> None:
        self.frozen = frozen
        self.model = frozen.model
        self.family = frozen.family
        self.images = ImageFeatureCache(image_cache_size, metrics)
        self.state: DecodeState | None = None
        self.row_ids: list[str] = []

    @torch.inference_mode()
    def prefill(self, rows: Sequence[PreparedRow]) -> Tensor:
        """Prefill `rows` as one batch and append them to the running batch; returns their logits [n, V]."""
        features = self._image_features(rows)
        inputs = [RowInput(r.input_ids, features[i], r.prefix, r.image_inputs()) for i, r in enumerate(rows)]
        logits, new_state = self.family.prefill(self.model, inputs)
        self.state = new_state if self.state is None else DecodeState.merge([self.state, new_state])
        self.row_ids += [r.request_id for r in rows]
        return logits.float()

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int]) -> Tensor:
        """Advance every running row by its last token (in `row_ids` order); returns logits [B, V]."""
        assert self.state is not None and len(tokens) == len(self.row_ids)
        device = self.state.attention_mask.device
        tokens_t = torch.tensor(list(tokens), device=device)
        return self.family.decode_step(self.model, self.state, tokens_t).float()

    def drop(self, request_ids: set[str]) -> None:
        """Remove rows (finished, aborted, expired) from the running batch."""
        keep = [i for i, rid in enumerate(self.row_ids) if rid not in request_ids]
        if len(keep) == len(self.row_ids):
            return
        self.row_ids = [self.row_ids[i] for i in keep]
        self.state = self.state.select(keep) if keep and self.state is not None else None

    def reset(self) -> None:
        """Forget the running batch (after an engine error)."""
        self.state, self.row_ids = None, []

    def _image_features(self, rows: Sequence[PreparedRow]) -> list[Tensor | None]:
        """Each row's image features [n_tokens, D] (its images in order), from the cache or one batched encode."""
        found: dict[tuple[str, str], Tensor] = {}
        missing: dict[tuple[str, str], tuple[ImageInput, BundlePrefix | None]] = {}
        for row in rows:
            images = row.image_inputs()
            for idx, key in enumerate(row.image_keys):
                cache_key = (key, row.bundle_key)
                if cache_key in found or cache_key in missing:
                    continue
                hit = self.images.get(cache_key)
                if hit is not None:
                    found[cache_key] = hit
                else:
                    missing[cache_key] = (images[idx], row.prefix)
        if missing:
            encoded = self.family.encode_images(
                self.model, [im for im, _ in missing.values()], [pre for _, pre in missing.values()]
            )  # M x [N_i, D]
            for i, cache_key in enumerate(missing):
                found[cache_key] = encoded[i]
                self.images.put(cache_key, encoded[i])
        return [
            torch.cat([found[(key, row.bundle_key)] for key in row.image_keys]) if row.image_keys else None
            for row in rows
        ]
