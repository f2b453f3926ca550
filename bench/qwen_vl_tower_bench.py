"""Vision-tower cost of the Qwen-VL prompt path, side by side in one process: HF's own tower
(`model.model.get_image_features`) vs ours without a bundle vs ours with deep visual prompts (Lv = 10 per block).

    python -m bench.qwen_vl_tower_bench --out bench/results

The towers have the real widths (Qwen2.5-VL-7B: 1280 wide, 16 heads, windows of 112 px; Qwen3-VL-2B: 1024 wide,
16 heads) but only 4 blocks, with random weights and a tiny LLM. We time one 448x448 image and a batch of three
images of different sizes (medians of `--repeats` interleaved rounds), and write `qwen_vl_tower.md` + `.json`.
CPU fp32. We measure speed, not answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

REAL_TOWERS = {
    "qwen2_5_vl": {"vit_dim": 1280, "vit_heads": 16, "vit_mlp": 3420, "patch_size": 14, "window_size": 112},
    "qwen3_vl": {"vit_dim": 1024, "vit_heads": 16, "vit_mlp": 4096, "patch_size": 16},
}
IMAGES = {"one 448x448": [(448, 448)], "three mixed": [(448, 448), (224, 336), (336, 224)]}


def build(family: str):
    from m2pt.families.registry import family_of
    from m2pt.loading import freeze
    from training.tiny_qwen import TinyQwenVLConfig, build_image_processor, build_qwen_model

    cfg = TinyQwenVLConfig(
        family=family, vit_layers=4, llm_dim=64, max_pixels=448 * 448, **REAL_TOWERS[family]
    )
    model = freeze(build_qwen_model(cfg, len(cfg.vocabulary())))
    return model, family_of(model), build_image_processor(cfg)


def random_images(sizes: list[tuple[int, int]]) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in sizes]


def timed_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in rotation (one of each per round) so that load from other processes
    on a shared machine hits every variant alike; one warm-up round first."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(family: str, repeats: int) -> dict:
    from m2pt.prompts import init_prompts

    model, adapter, image_processor = build(family)
    spec = adapter.spec_from_model(model, family)
    prefix = adapter.compute_prefix(model, init_prompts(spec, 0, 10, None, seed=0))
    out = {}
    for label, sizes in IMAGES.items():
        encoded = image_processor(random_images(sizes), return_tensors="pt")
        images = adapter.split_images(encoded)
        pixels, grid = encoded["pixel_values"], encoded["image_grid_thw"]
        with torch.inference_mode():
            t = timed_interleaved(
                {
                    "hf": lambda p=pixels, g=grid: model.model.get_image_features(p, g),
                    "ours": lambda ims=images: adapter.encode_images(model, ims, [None] * len(ims)),
                    "prompted": lambda ims=images: adapter.encode_images(model, ims, [prefix] * len(ims)),
                },
                repeats,
            )
        hf, ours, prompted = t["hf"], t["ours"], t["prompted"]
        patches = int(encoded["image_grid_thw"].prod(-1).sum())
        out[label] = {"patches": patches, "hf_s": hf, "ours_s": ours, "prompted_s": prompted}
        log.info(
            "%s %s: %d patches, HF %.3f s, ours %.3f s, prompted %.3f s",
            family,
            label,
            patches,
            hf,
            ours,
            prompted,
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    results = {family: measure(family, args.repeats) for family in REAL_TOWERS}
    payload = {
        "machine": f"{platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "repeats": args.repeats,
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "qwen_vl_tower.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "# Qwen-VL vision tower: HF vs the prompt path (4 blocks of real width, CPU fp32)",
        "",
        (
            f"Command: `python -m bench.qwen_vl_tower_bench --repeats {args.repeats} --threads {args.threads}`; "
            f"{payload['machine']}; medians of {args.repeats} rounds, variants interleaved. Measured on a 2-core VM "
            "shared with other jobs: read the ratios, not the seconds."
        ),
        "",
        "| family | images | patches | HF s | ours, no bundle s | ours / HF | ours, Lv=10 s | Lv=10 / no bundle |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for family, rows in results.items():
        for label, r in rows.items():
            lines.append(
                f"| {family} | {label} | {r['patches']} | {r['hf_s']:.3f} | {r['ours_s']:.3f} | "
                f"{r['ours_s'] / r['hf_s']:.2f} | {r['prompted_s']:.3f} | {r['prompted_s'] / r['ours_s']:.2f} |"
            )
    (out / "qwen_vl_tower.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
