"""Closed-loop async HTTP load generator for the OpenAI-compatible streaming endpoint.

`clients` coroutines each take the next request from a shared list and stream it, recording the time of every
content chunk. Output: throughput (requests/s, completion tokens/s) and client-side latency percentiles.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import logging
import time
from dataclasses import asdict, dataclass, field

import httpx

log = logging.getLogger(__name__)


@dataclass
class RequestTiming:
    start: float
    first: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class LoadResult:
    label: str
    clients: int
    requests: int
    errors: int
    wall_s: float
    completion_tokens: int
    requests_per_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    engine: dict = field(default_factory=dict)  # engine phase split, when the server exposes it

    def to_json(self) -> dict:
        return asdict(self)


def image_data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(model: str, instruction: str, image_uri: str, max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_uri}},
                    {"type": "text", "text": instruction},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _stream_one(client: httpx.AsyncClient, url: str, body: dict) -> RequestTiming:
    timing = RequestTiming(start=time.perf_counter())
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                timing.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return timing
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    timing.completion_tokens = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    timing.first = timing.first or now
                    timing.chunk_times.append(now)
    except httpx.HTTPError as exc:
        timing.error = repr(exc)
    if not timing.completion_tokens:
        timing.completion_tokens = len(timing.chunk_times)
    return timing


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


async def run_load(
    base_url: str, bodies: list[dict], clients: int, label: str, timeout_s: float = 900
) -> LoadResult:
    """Send `bodies` with `clients` concurrent closed-loop clients; returns the aggregate."""
    url = base_url.rstrip("/") + "/v1/chat/completions"
    pending = list(enumerate(bodies))
    timings: list[RequestTiming] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while pending:
            _, body = pending.pop(0)
            timings.append(await _stream_one(client, url, body))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - start
    ok = [t for t in timings if t.error is None]
    ttft = [(t.first - t.start) * 1000 for t in ok if t.first is not None]
    itl = [(b - a) * 1000 for t in ok for a, b in itertools.pairwise(t.chunk_times)]
    tokens = sum(t.completion_tokens for t in ok)
    errors = [t.error for t in timings if t.error]
    if errors:
        log.warning("%s: %d errors, first: %s", label, len(errors), errors[0])
    return LoadResult(
        label=label,
        clients=clients,
        requests=len(timings),
        errors=len(errors),
        wall_s=round(wall, 2),
        completion_tokens=tokens,
        requests_per_s=round(len(ok) / wall, 3),
        tokens_per_s=round(tokens / wall, 2),
        ttft_p50_ms=round(_pct(ttft, 0.5), 1),
        ttft_p99_ms=round(_pct(ttft, 0.99), 1),
        itl_p50_ms=round(_pct(itl, 0.5), 1) if itl else float("nan"),
        itl_p99_ms=round(_pct(itl, 0.99), 1) if itl else float("nan"),
    )
