"""The benchmark baseline: the official repository's way of serving, batch size 1 with Hugging Face `generate`.

Each request runs alone (a lock serialises them): the image goes through the ViT with its bundle's visual prompts,
the bundle's text prompts enter as a prefilled KV cache, and `model.generate` decodes greedily. Bundles are loaded
once and kept (fair to the baseline). It implements `EngineClient`, so the same HTTP app and load generator measure it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import torch

from m2pt.prefix import compute_prefix
from server.engine.preprocess import Preprocessor
from server.engine.types import GenerationRequest, StreamEvent


class HFGenerateBatch1Engine:
    def __init__(self, frozen, store, limits=None, model_id: str = "base") -> None:
        self.frozen, self.store, self.limits = frozen, store, limits
        self.spec = frozen.spec
        self._model_id = model_id
        self._prefixes: dict[str, object] = {}
        self._lock = threading.Lock()
        self._pre = Preprocessor(frozen)

    @property
    def ready(self) -> bool:
        return True

    @property
    def base_model_id(self) -> str:
        return self._model_id

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        ref = self.store.resolve(request.bundle) if request.bundle else None
        text, prompt_tokens, completion = await asyncio.to_thread(self._run, request, ref)
        yield StreamEvent(
            request.request_id, text, "length", prompt_tokens, completion, None if ref is None else ref.label
        )

    def _prefix(self, ref):
        if ref is None:
            return None
        if ref.content_hash not in self._prefixes:
            loaded = self.store.load(ref, self.spec, self.limits)
            with torch.inference_mode():
                self._prefixes[ref.content_hash] = compute_prefix(self.frozen.model, loaded.prompts)
        return self._prefixes[ref.content_hash]

    @torch.inference_mode()
    def _run(self, request: GenerationRequest, ref) -> tuple[str, int, int]:
        from transformers import DynamicCache

        with self._lock:
            model = self.frozen.model
            prefix = self._prefix(ref)
            row = self._pre.prepare(request, None)
            ids = row.input_ids[None]  # [1, T]
            embeds = model.model.get_input_embeddings()(ids)  # [1, T, D]
            images = list(row.images or [])  # the family's per-image inputs (preprocess fills them)
            if images:
                feats = torch.cat(
                    self.frozen.family.encode_images(model, images, [prefix] * len(images))
                )  # [sum N_i, D]
                slots = (ids == self.spec.image_token_id)[..., None].expand_as(embeds)
                embeds = embeds.masked_scatter(slots, feats)
            lt = 0 if prefix is None else prefix.text_len
            cache = DynamicCache(config=model.config)
            if lt:
                kv = [(prefix.text_k[i][None], prefix.text_v[i][None]) for i in range(prefix.text_k.shape[0])]
                cache = DynamicCache(ddp_cache_data=kv, config=model.config)
            embeds = torch.cat([embeds.new_zeros(1, lt, embeds.shape[-1]), embeds], dim=1)
            mask = torch.ones(1, embeds.shape[1], dtype=torch.long)
            out = model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                cache=cache,
                max_new_tokens=request.sampling.max_tokens,
                min_new_tokens=request.sampling.max_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            tokens = out[0].tolist()
            text = self.frozen.processor.tokenizer.decode(tokens, skip_special_tokens=True)
            return text, int(ids.shape[1]), len(tokens)
