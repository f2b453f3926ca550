"""A mid-size random-init LLaVA for benchmarks (~190 M parameters, 224 px images, 256 image tokens, vocab 32000)
and a store of random prompt bundles for it. Random weights: we measure speed, not answers."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

VOCAB_WORDS = ["describe", "the", "image", "what", "is", "in", "picture", "tell", "me", "about", "this"]


def mid_config():
    from training.tiny import TinyLlavaConfig

    filler = [f"w{i}" for i in range(32000 - 5 - 6 - len(VOCAB_WORDS))]
    return TinyLlavaConfig(
        words=VOCAB_WORDS + filler,
        image_size=224,
        patch_size=14,
        vit_dim=512,
        vit_layers=6,
        vit_heads=8,
        vit_mlp=2048,
        llm_dim=1024,
        llm_layers=8,
        llm_heads=16,
        llm_kv_heads=16,
        llm_mlp=2816,
        select_strategy="default",
        max_positions=2048,
        seed=0,
    )


def build_mid_model(out_dir: Path) -> Path:
    """Write the mid model to `out_dir` once (reused when its config.json exists)."""
    from training.tiny import build_tiny_llava

    if (out_dir / "config.json").exists():
        return out_dir
    return build_tiny_llava(out_dir, mid_config())


def build_bundle_store(
    model_dir: Path,
    store_dir: Path,
    count: int,
    text_len: int = 10,
    visual_len: int = 10,
    projector: bool = True,
    prefix: str = "b",
) -> list[str]:
    """Publish `count` random bundles (deep text + visual prompts, + projector unless `projector=False`) named
    b00, b01, ... (`prefix` + index); returns the names. Existing ones are kept."""
    from m2pt.loading import load_frozen_llava
    from m2pt.prompts import init_prompts
    from prompts_store.format import save_bundle
    from prompts_store.store import BundleStore

    store = BundleStore(store_dir)
    existing = {info.name for info in store.list()}
    width = 2 if count <= 100 else len(str(count - 1))
    names = [f"{prefix}{i:0{width}d}" for i in range(count)]
    if all(n in existing for n in names):
        return names
    frozen = load_frozen_llava(str(model_dir), device="cpu", dtype="float32")
    base_projector = frozen.model.model.multi_modal_projector.state_dict() if projector else None
    for i, name in enumerate(names):
        if name in existing:
            continue
        prompts = init_prompts(frozen.spec, text_len, visual_len, base_projector, seed=i)
        src = store_dir.parent / f".src_{name}"
        save_bundle(src, prompts, frozen.spec, name, provenance={"dataset": "random (benchmark)"})
        store.publish(src, name)
    log.info("published %d benchmark bundles to %s", count, store_dir)
    return names


def random_image(seed: int, size: int = 224):
    """A distinct noise image per seed (so image-feature caching cannot help either side)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")
