"""Hot-swap latency: time from a bundle upload's HTTP response to the first token generated with that version.

    python -m bench.hotswap_bench --out bench/results

For each model, `--rounds` new versions of one bundle are uploaded to a running `m2pt serve`; right after each
upload answers, a streaming chat names the bundle and we time its first token ("cold": read + validate + precompute
the prefix + encode the image + prefill). A second chat on the same, now resident version with a new image gives
"warm"; cold − warm is the cost of making a new version live. Models:
  tiny        the test model (Lt 4, Lv 2, projector)
  7b-shaped   a random-init model whose *bundle* has LLaVA-1.5-7B's shapes: text 32 × 10 × 4096, visual 24 × 10 × 1024,
              MLP projector 1024→4096→4096 (≈ 90 MB fp32). Its attention is narrow (1 head of 128 in the LLM) so it fits
              this 2-core machine; the bundle (and so its I/O, validation and hashing) is full size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

from bench.loadgen import image_data_uri
from bench.mid_model import random_image
from bench.serve_bench import free_port, running_server

log = logging.getLogger("bench.hotswap")
TOKEN = "bench-ops-token-0123"


def seven_b_shaped_config():
    from training.tiny import TinyLlavaConfig

    return TinyLlavaConfig(
        words=["describe", "the", "image"] + [f"w{i}" for i in range(50)],
        image_size=224,
        patch_size=14,
        vit_dim=1024,
        vit_layers=24,
        vit_heads=16,
        vit_mlp=64,
        llm_dim=4096,
        llm_layers=32,
        llm_heads=1,
        llm_kv_heads=1,
        llm_head_dim=128,
        llm_mlp=64,
        select_strategy="default",
    )


def tiny_config():
    from training.tiny import TinyLlavaConfig

    return TinyLlavaConfig(words=["describe", "the", "image"])


def build(work: Path, which: str) -> tuple[Path, list[Path]]:
    """The model dir and `rounds` bundle dirs (different content, same name) for `which`."""
    from m2pt.loading import load_frozen_llava
    from m2pt.prompts import init_prompts
    from prompts_store.format import save_bundle
    from training.tiny import build_tiny_llava

    model_dir = work / which / "model"
    if not (model_dir / "config.json").exists():
        build_tiny_llava(model_dir, seven_b_shaped_config() if which == "7b-shaped" else tiny_config())
    frozen = load_frozen_llava(str(model_dir), device="cpu", dtype="float32")
    lt, lv = (10, 10) if which == "7b-shaped" else (4, 2)
    bundles = []
    for seed in range(6):
        out = work / which / f"bundle{seed}"
        if not (out / "manifest.json").exists():
            prompts = init_prompts(
                frozen.spec, lt, lv, frozen.model.model.multi_modal_projector.state_dict(), seed=seed
            )
            save_bundle(out, prompts, frozen.spec, "swap")
        bundles.append(out)
    return model_dir, bundles


def first_token_s(url: str, image_seed: int) -> float:
    body = {
        "bundle": "swap",
        "instruction": "describe the image",
        "image": image_data_uri(random_image(image_seed)),
        "max_tokens": 2,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    with httpx.stream("POST", url + "/v1/chat", json=body, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - start
    raise RuntimeError("no token")


def measure(url: str, bundles: list[Path]) -> dict:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    rows = []
    for i, bundle in enumerate(bundles):
        files = {
            "manifest": (bundle / "manifest.json").read_bytes(),
            "tensors": (bundle / "tensors.safetensors").read_bytes(),
        }
        start = time.perf_counter()
        resp = httpx.post(url + "/v1/bundles", files=files, headers=headers, timeout=300)
        upload_s = time.perf_counter() - start
        resp.raise_for_status()
        cold = first_token_s(url, 1000 + 2 * i)
        warm = first_token_s(url, 1001 + 2 * i)
        rows.append(
            {
                "version": resp.json()["version"],
                "upload_s": upload_s,
                "cold_ttft_s": cold,
                "warm_ttft_s": warm,
            }
        )
        log.info(
            "%s: upload %.3f s, cold first token %.3f s, warm %.3f s",
            rows[-1]["version"],
            upload_s,
            cold,
            warm,
        )
    rows = rows[1:]  # the first round also warms up the server's code paths

    def med(key):
        return round(statistics.median(r[key] for r in rows), 4)

    return {
        "rounds": rows,
        "bundle_bytes": sum(f.stat().st_size for f in bundles[0].iterdir()),
        "median_upload_s": med("upload_s"),
        "median_cold_first_token_s": med("cold_ttft_s"),
        "median_warm_first_token_s": med("warm_ttft_s"),
        "median_swap_cost_s": round(statistics.median(r["cold_ttft_s"] - r["warm_ttft_s"] for r in rows), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=Path("runs/hotswap"))
    parser.add_argument("--models", nargs="+", default=["tiny", "7b-shaped"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ["M2PT_OPS_TOKEN"] = TOKEN
    results = {}
    for which in args.models:
        model_dir, bundles = build(args.work, which)
        port = free_port()
        store = args.work / which / "store"
        cmd = [
            sys.executable,
            "-m",
            "m2pt_cli",
            "serve",
            "--model",
            str(model_dir),
            "--store",
            str(store),
            "--port",
            str(port),
        ]
        with running_server(cmd, port) as url:
            results[which] = measure(url, bundles)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hotswap.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Hot-swap: upload response → first token of the new version",
        "",
        f"Command: `python -m bench.hotswap_bench {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        (
            "| model | bundle size | upload (HTTP, validate, publish) | cold first token | warm first token "
            "| swap cost (cold − warm) |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for which, r in results.items():
        lines.append(
            f"| {which} | {r['bundle_bytes'] / 1e6:.2f} MB | {r['median_upload_s']:.3f} s | "
            f"{r['median_cold_first_token_s']:.3f} s | {r['median_warm_first_token_s']:.3f} s | "
            f"{r['median_swap_cost_s']:.3f} s |"
        )
    lines += [
        "",
        "Medians over 5 uploads of new versions (a 6th, first, round is a warm-up and not counted).",
    ]
    (args.out / "hotswap.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write((args.out / "hotswap.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
