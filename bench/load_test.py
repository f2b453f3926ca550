"""Load test of issue 9: N concurrent streaming clients for a fixed time over mixed bundles on the demo model.

    PYTHONPATH=$PWD python -m bench.load_test       # 64 clients, 120 s, demo/base + demo/bundles
    PYTHONPATH=$PWD python -m bench.load_test --clients 4 --duration 10 --warmup 3 --out /tmp/x   # smoke

It starts the real `m2pt serve` (child process, `bench.serve_proc`) on a COPY of the demo store, then runs
closed-loop clients: each streams `POST /v1/chat` requests (bundle cycling through none / digits / size /
digits@v1, the demo example images, `max_tokens` tokens with `ignore_eos` so every answer has the same
length), one after the other, until the time is up. Reported:
- errors other than 429-with-Retry-After (target 0), and the 429s apart;
- TTFT (request sent -> first content chunk) and ITL (gap between content chunks) p50 / p99, over requests
  started after the warm-up;
- the server's RSS sampled every second: drift = (mean of the last 10 % of samples - RSS at the end of the
  warm-up) / RSS at the end of the warm-up (target < 5 %).
Results go to `<out>/load.json` and `<out>/load.md`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.serve_proc import ServeProcess

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MIX = [
    (None, "red_circle.png", "What color is the shape?"),
    ("digits", "digit_7.png", "What digit is this?"),
    ("size", "red_circle.png", "Is the shape big or small?"),
    ("digits@v1", "digit_3.png", "What digit is this?"),
    (None, "three_shapes.png", "How many shapes are there?"),
    ("size", "green_triangle.png", "Is the shape big or small?"),
]


@dataclass
class Sample:
    start: float
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    status: int | None = None
    retry_after: str | None = None
    error: str | None = None


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> Sample:
    sample = Sample(start=time.monotonic())
    try:
        async with client.stream("POST", url + "/v1/chat", json=body) as resp:
            sample.status = resp.status_code
            if resp.status_code != 200:
                sample.retry_after = resp.headers.get("retry-after")
                sample.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return sample
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    sample.error = f"in-band error {chunk['error']['type']}"
                    continue
                if chunk.get("text"):
                    sample.chunk_times.append(time.monotonic())
                if chunk.get("usage"):
                    sample.completion_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
    return sample


async def client_loop(client, url, bodies, offset, deadline, out: list[Sample]) -> None:
    i = offset
    while time.monotonic() < deadline:
        out.append(await stream_one(client, url, bodies[i % len(bodies)]))
        i += 1


async def sample_rss(server: ServeProcess, deadline: float, out: list[tuple[float, int]]) -> None:
    while time.monotonic() < deadline:
        out.append((time.monotonic(), server.rss_bytes()))
        await asyncio.sleep(1.0)


def request_bodies(max_tokens: int) -> list[dict]:
    bodies = []
    for bundle, image, question in MIX:
        data = base64.b64encode((REPO / "demo" / "examples" / image).read_bytes()).decode()
        bodies.append(
            {
                "bundle": bundle,
                "instruction": question,
                "image": data,
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": True,
            }
        )
    return bodies


async def drive(server: ServeProcess, clients: int, duration_s: float, max_tokens: int):
    bodies = request_bodies(max_tokens)
    samples: list[Sample] = []
    rss: list[tuple[float, int]] = []
    start = time.monotonic()
    deadline = start + duration_s
    # Idle connections expire on the client (2 s) before uvicorn closes them (its keep-alive timeout, 5 s): with
    # equal timeouts a request can go out on a connection the server is closing (a ReadError, no answer).
    limits = httpx.Limits(max_connections=clients + 8, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(
            sample_rss(server, deadline, rss),
            *(client_loop(client, server.url, bodies, i, deadline, samples) for i in range(clients)),
        )
    return start, samples, rss


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)


def summarise(start: float, samples: list[Sample], rss: list[tuple[float, int]], args) -> dict:
    warm = start + args.warmup
    measured = [s for s in samples if s.start >= warm]
    ok = [s for s in measured if s.error is None]
    throttled = [s for s in samples if s.status == 429 and s.retry_after]
    errors = [s for s in samples if s.error is not None and not (s.status == 429 and s.retry_after)]
    ttft = [(s.chunk_times[0] - s.start) * 1000 for s in ok if s.chunk_times]
    itl = [(b - a) * 1000 for s in ok for a, b in zip(s.chunk_times, s.chunk_times[1:], strict=False)]
    after = [b for t, b in rss if t >= warm]
    base_rss = after[0] if after else None
    tail = after[-max(1, len(after) // 10) :] if after else []
    drift = (statistics.mean(tail) - base_rss) / base_rss * 100 if base_rss else None
    kinds: dict[str, int] = {}
    for s in errors:
        key = (s.error or "")[:60]
        kinds[key] = kinds.get(key, 0) + 1
    return {
        "clients": args.clients,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "max_tokens": args.max_tokens,
        "requests": len(samples),
        "requests_after_warmup": len(measured),
        "completed_after_warmup": len(ok),
        "errors": len(errors),
        "error_kinds": kinds,
        "throttled_429_with_retry_after": len(throttled),
        "completion_tokens_per_s": round(
            sum(len(s.chunk_times) for s in ok) / (args.duration - args.warmup), 2
        ),
        "ttft_p50_ms": pct(ttft, 0.5),
        "ttft_p99_ms": pct(ttft, 0.99),
        "itl_p50_ms": pct(itl, 0.5),
        "itl_p99_ms": pct(itl, 0.99),
        "rss_after_warmup_mb": round(base_rss / 2**20, 1) if base_rss else None,
        "rss_end_mb": round(after[-1] / 2**20, 1) if after else None,
        "rss_max_mb": round(max(after) / 2**20, 1) if after else None,
        "rss_drift_pct": round(drift, 2) if drift is not None else None,
    }


def to_markdown(result: dict) -> str:
    r = result
    flags = " ".join(r["server_flags"]) or "(defaults)"
    return "\n".join(
        [
            "# Load test (issue 9)",
            "",
            f"`{r['command']}` — {r['when']}; {r['machine']}",
            "",
            (
                f"{r['clients']} concurrent streaming clients for {r['duration_s']} s (first {r['warmup_s']} s "
                "are warm-up) over mixed bundles (none, digits, size, digits@v1) on the demo model, "
                f"{r['max_tokens']} tokens per answer. Server flags: `{flags}`."
            ),
            "",
            "| figure | value | target |",
            "|---|---:|---:|",
            f"| requests (after warm-up, completed) | {r['requests']} ({r['completed_after_warmup']}) | – |",
            f"| errors other than 429 + Retry-After | {r['errors']} | 0 |",
            f"| 429 with Retry-After | {r['throttled_429_with_retry_after']} | – |",
            f"| completion tokens/s | {r['completion_tokens_per_s']} | – |",
            f"| TTFT p50 / p99 | {r['ttft_p50_ms']} / {r['ttft_p99_ms']} ms | – |",
            f"| ITL p50 / p99 | {r['itl_p50_ms']} / {r['itl_p99_ms']} ms | – |",
            (
                f"| RSS after warm-up → end (max) | {r['rss_after_warmup_mb']} → {r['rss_end_mb']} MB "
                f"({r['rss_max_mb']}) | – |"
            ),
            f"| RSS drift after warm-up | {r['rss_drift_pct']} % | < 5 % |",
            "",
            f"Error kinds: `{r['error_kinds']}`" if r["error_kinds"] else "No errors.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--warmup", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", default=str(REPO / "demo" / "base"))
    parser.add_argument("--store", default=str(REPO / "demo" / "bundles"))
    parser.add_argument("--server-flag", action="append", default=[], help="extra `m2pt serve` flag")
    parser.add_argument("--note", default="", help="what to say about the machine (e.g. other load on it)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        shutil.copytree(args.store, store, ignore=shutil.ignore_patterns(".locks", ".tmp", "*.png"))
        flags = list(args.server_flag)  # the defaults unless told: max batch 16, queue 64
        with ServeProcess(args.model, store, Path(tmp) / "serve.log", flags) as server:
            start, samples, rss = asyncio.run(drive(server, args.clients, args.duration, args.max_tokens))
    result = summarise(start, samples, rss, args)
    result.update(
        command=" ".join(["PYTHONPATH=$PWD python -m bench.load_test", *(argv or sys.argv[1:])]),
        when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=f"{os.cpu_count()} CPU cores, fp32 on CPU" + (f"; {args.note}" if args.note else ""),
        server_flags=flags,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "load.md").write_text(to_markdown(result))
    log.info("%s", json.dumps(result, indent=2))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    raise SystemExit(main())
