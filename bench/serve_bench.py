"""Serving benchmark: one run, one model, every comparison side by side.

    python -m bench.serve_bench --out bench/results            # mid-size model (~190 M params, 224 px), 64 tokens
    python -m bench.serve_bench --out /tmp/b --model-size tiny  # smoke run of the whole pipeline in a minute

Servers run one at a time as subprocesses on localhost (they share the 2 cores otherwise):
  ours                      `m2pt serve` (continuous batching, mixed bundles in one forward, default flags)
  ours, bundle rotation     `m2pt serve` on a store of 1,000 bundles (prompts only): requests rotate through
                            them (each one a cold load past the default residency) vs 5 resident bundles
  ours, 1 bundle per step   `m2pt serve --max-bundles-per-batch 1` (vLLM `--max-loras 1` behaviour)
  baseline                  HF `generate`, batch 1, prompts applied (the official repository's way)
Writes `results.json` and `results.md` (quoted by the README) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.loadgen import LoadResult, chat_body, image_data_uri, run_load
from bench.mid_model import build_bundle_store, build_mid_model, random_image
from bench.serve_proc import wait_ready

log = logging.getLogger("bench")
INSTRUCTION = "describe the image"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(cmd: list[str], port: int, ready_timeout: float = 600):
    """Start a server subprocess, wait for /ready, yield its URL, stop it (SIGTERM, then SIGKILL)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    logfile = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_server_{port}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=logfile, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_ready(lambda: httpx.get(url + "/ready", timeout=2), ready_timeout, proc, 0.5):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}; see {logfile.name}")
            raise RuntimeError(f"server not ready after {ready_timeout} s; see {logfile.name}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        logfile.close()


def make_bodies(
    n: int, mode: str, bundles: list[str], base_id: str, max_tokens: int, seed0: int
) -> list[dict]:
    """`mode`: single (all on bundles[0]), distinct (round-robin over all bundles from index `seed0`), none
    (base model)."""
    bodies = []
    for i in range(n):
        distinct = bundles[(seed0 + i) % len(bundles)]
        model = {"single": bundles[0], "distinct": distinct, "none": base_id}[mode]
        bodies.append(chat_body(model, INSTRUCTION, image_data_uri(random_image(seed0 + i)), max_tokens))
    return bodies


def engine_phase_seconds(url: str) -> dict[str, float]:
    """Cumulative engine time per phase and decode-step count, read from /metrics (zeros for the baseline)."""
    out = {"prefill_s": 0.0, "decode_s": 0.0, "prefill_steps": 0.0, "decode_steps": 0.0}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        for phase in ("prefill", "decode"):
            if line.startswith(f'm2pt_engine_step_seconds_sum{{phase="{phase}"}}'):
                out[f"{phase}_s"] = float(line.split()[-1])
            if line.startswith(f'm2pt_engine_step_seconds_count{{phase="{phase}"}}'):
                out[f"{phase}_steps"] = float(line.split()[-1])
    return out


async def scenario(
    url: str, mode: str, clients: int, args, bundles: list[str], seed0: int, label: str
) -> LoadResult:
    base_id = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    n = max(args.requests_per_client * clients, 4)
    bodies = make_bodies(n, mode, bundles, base_id, args.max_tokens, seed0)
    before = engine_phase_seconds(url)
    result = await run_load(url, bodies, clients, label)
    after = engine_phase_seconds(url)
    delta = {k: after[k] - before[k] for k in after}
    if delta["decode_steps"]:
        steps = delta["decode_steps"] + delta["prefill_steps"]
        result.engine = {
            # "prefill" steps carry prompt work (chunks / image encodes) besides the decode rows
            "prompt_step_share_of_wall": round(delta["prefill_s"] / result.wall_s, 3),
            "decode_only_step_share_of_wall": round(delta["decode_s"] / result.wall_s, 3),
            "tokens_per_step": round(result.completion_tokens / steps, 2),
            "decode_only_ms_per_step": round(1000 * delta["decode_s"] / delta["decode_steps"], 1),
            "prompt_step_ms": round(1000 * delta["prefill_s"] / max(1.0, delta["prefill_steps"]), 1),
        }
    log.info(
        "%-40s %6.2f tok/s  %5.3f req/s  ttft p50 %7.0f ms  errors %d",
        label,
        result.tokens_per_s,
        result.requests_per_s,
        result.ttft_p50_ms,
        result.errors,
    )
    return result


async def warm_up(url: str, bundles: list[str], args, n: int | None = None) -> None:
    """Short requests on each of `bundles` (or the first `n`), so every bundle a scenario uses is resident and
    compared scenarios differ in batching only (cold loads are the rotation scenario's subject)."""
    count = len(bundles) if n is None else n
    await run_load(url, make_bodies(count, "distinct", bundles, "x", 4, 10_000), 2, "warm-up")


def serve_cmd(args, model_dir: Path, store: Path, port: int, extra: list[str]) -> list[str]:
    return [
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
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-queue",
        "512",
        "--request-timeout",
        "3600",  # a slow (contended) run must not turn into timeouts
        *extra,
    ]


async def run_rotation(args, model_dir: Path, store: Path, rotation: list[str]) -> dict[str, LoadResult]:
    """5 resident bundles vs rotating through all of `rotation` (every request a bundle not used before)."""
    results: dict[str, LoadResult] = {}
    port = free_port()
    with running_server(serve_cmd(args, model_dir, store, port, []), port) as url:
        await warm_up(url, rotation[:5], args, n=5)
        results["ours/rotate5/16"] = await scenario(
            url, "distinct", 16, args, rotation[:5], 0, "ours, 5 bundles (prompts only), 16 clients"
        )
        results["ours/rotate1000/16"] = await scenario(
            url,
            "distinct",
            16,
            args,
            rotation,
            100,
            f"ours, {len(rotation)} bundles in rotation (prompts only), 16 clients",
        )
    return results


async def run_all(
    args, model_dir: Path, store: Path, bundles: list[str], rotation_store: Path, rotation: list[str]
) -> dict[str, LoadResult]:
    results: dict[str, LoadResult] = {}
    port = free_port()
    with running_server(serve_cmd(args, model_dir, store, port, []), port) as url:
        await warm_up(url, bundles, args)
        for mode in ("single", "distinct", "none"):
            results[f"ours/{mode}/16"] = await scenario(
                url, mode, 16, args, bundles, 0, f"ours, {mode} bundle(s), 16 clients"
            )
        for clients in () if args.quick else (1, 4):
            results[f"ours/distinct/{clients}"] = await scenario(
                url, "distinct", clients, args, bundles, 0, f"ours, distinct, {clients} clients"
            )
    port = free_port()
    with running_server(
        serve_cmd(args, model_dir, store, port, ["--max-bundles-per-batch", "1"]), port
    ) as url:
        await warm_up(url, bundles, args)
        results["one-bundle-per-step/distinct/16"] = await scenario(
            url, "distinct", 16, args, bundles, 0, "ours --max-bundles-per-batch 1, 16 clients"
        )
    results.update(await run_rotation(args, model_dir, rotation_store, rotation))
    port = free_port()
    baseline = [
        sys.executable,
        "-m",
        "bench.baseline_server",
        "--model",
        str(model_dir),
        "--store",
        str(store),
        "--port",
        str(port),
    ]
    with running_server(baseline, port) as url:
        await warm_up(url, bundles, args)
        for clients in (16,) if args.quick else (1, 4, 16):
            results[f"baseline/distinct/{clients}"] = await scenario(
                url, "distinct", clients, args, bundles, 0, f"baseline HF generate batch 1, {clients} clients"
            )
    return results


def ratios(results: dict[str, LoadResult]) -> dict[str, float]:
    tps = {k: v.tokens_per_s for k, v in results.items()}
    mixed = results["ours/distinct/16"]
    return {
        "itl_p99_over_p50_16_distinct": round(mixed.itl_p99_ms / mixed.itl_p50_ms, 2),
        "mixed_vs_single_bundle": round(tps["ours/distinct/16"] / tps["ours/single/16"], 3),
        "mixed_vs_no_bundle": round(tps["ours/distinct/16"] / tps["ours/none/16"], 3),
        **{
            f"ours_vs_batch1_baseline_{c}_clients": round(
                tps[f"ours/distinct/{c}"] / tps[f"baseline/distinct/{c}"], 3
            )
            for c in (1, 4, 16)
            if f"baseline/distinct/{c}" in tps and f"ours/distinct/{c}" in tps
        },
        "ours_vs_one_bundle_per_step_16_distinct": round(
            tps["ours/distinct/16"] / tps["one-bundle-per-step/distinct/16"], 3
        ),
        "rotation_1000_vs_5_bundles": round(tps["ours/rotate1000/16"] / tps["ours/rotate5/16"], 3),
    }


def write_reports(out: Path, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"# Serving benchmark ({payload['model']})",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Machine: {payload['machine']}; {payload['max_tokens']} output tokens per request; greedy.",
        "",
        *[f"{note}" for note in payload.get("notes", [])],
        "",
        (
            "| scenario | clients | requests | tok/s | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
            "| ITL p99/p50 | errors |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["results"].values():
        spread = round(r["itl_p99_ms"] / r["itl_p50_ms"], 2) if r["itl_p50_ms"] == r["itl_p50_ms"] else "–"
        lines.append(
            f"| {r['label']} | {r['clients']} | {r['requests']} | {r['tokens_per_s']} | {r['requests_per_s']} | "
            f"{r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['itl_p50_ms']} | {r['itl_p99_ms']} | {spread} "
            f"| {r['errors']} |"
        )
    lines += ["", "## Ratios (throughput in completion tokens/s, same run, same model)", ""]
    lines += [f"- {k}: **{v}**" for k, v in payload["ratios"].items()]
    lines += ["", "## Where the engine's time went (from its /metrics, per scenario)", ""]
    lines += [f"- {r['label']}: {r['engine']}" for r in payload["results"].values() if r.get("engine")]
    lines += ["", "## CPU bound (in-process, same model)", ""]
    lines += [f"- {k}: {v}" for k, v in payload["cpu_bound"].items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--work", type=Path, default=Path("runs/bench"), help="model and bundle store (rebuilt if absent)"
    )
    parser.add_argument("--model-size", choices=["mid", "tiny"], default="mid")
    parser.add_argument("--bundles", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--rotation-bundles", type=int, default=1000)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="reduced run: no 1/4-client scenarios, baseline at 16 clients only",
    )
    parser.add_argument(
        "--note", action="append", default=[], help="a line for the results file (repeatable)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from bench.cpu_bound import measure_cpu_bound
    from m2pt.loading import load_frozen_llava

    work = args.work / args.model_size
    model_dir = build_mid_model(work / "model") if args.model_size == "mid" else _tiny_model(work / "model")
    bundles = build_bundle_store(model_dir, work / "store", args.bundles)
    rotation = build_bundle_store(
        model_dir, work / "store_rotation", args.rotation_bundles, projector=False, prefix="r"
    )
    frozen = load_frozen_llava(str(model_dir), device="cpu", dtype="float32")
    prompt_ids = frozen.processor(
        images=[random_image(0)],
        text=frozen.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}],
            add_generation_prompt=True,
        ),
        return_tensors="pt",
    )["input_ids"][0]
    cpu_bound = measure_cpu_bound(frozen, prompt_ids, args.max_tokens, batch=args.max_batch_size)
    params = sum(p.numel() for p in frozen.model.parameters())
    del frozen
    log.info("cpu bound: %s", cpu_bound)
    load_before = [round(x, 1) for x in os.getloadavg()]
    started = time.time()
    results = asyncio.run(
        run_all(args, model_dir, work / "store", bundles, work / "store_rotation", rotation)
    )
    load_after = [round(x, 1) for x in os.getloadavg()]
    payload = {
        "model": f"random-init LLaVA, {params / 1e6:.0f} M parameters ({args.model_size}), fp32 CPU",
        "command": "python -m bench.serve_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": (
            f"{os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}"
        ),
        "max_tokens": args.max_tokens,
        "notes": [
            *args.note,
            (
                f"Load average (1/5/15 min) of the machine: {load_before} at the start, {load_after} at the end; "
                f"the run took {time.time() - started:.0f} s; "
                f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}."
            ),
        ],
        "cpu_bound": cpu_bound,
        "results": {k: v.to_json() for k, v in results.items()},
        "ratios": ratios(results),
    }
    write_reports(args.out, payload)
    sys.stdout.write((args.out / "results.md").read_text())
    return 0


def _tiny_model(out: Path) -> Path:
    from training.tiny import TinyLlavaConfig, build_tiny_llava

    if (out / "config.json").exists():
        return out
    return build_tiny_llava(
        out,
        TinyLlavaConfig(
            words=["describe", "the", "image"] + [f"w{i}" for i in range(200)], image_size=224, patch_size=32
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
