"""Helpers of the fault tests: streaming chat clients run in threads that record what they saw, and a hash of
every file of a bundle store."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from api_fakes import png_b64


@dataclass
class StreamRecord:
    """What one streaming client saw: chunks, the final finish_reason, whether `[DONE]` came, any error."""

    chunks: int = 0
    tokens: int | None = None
    finish_reason: str | None = None
    done: bool = False
    status: int | None = None
    error: str | None = None
    first: threading.Event = field(default_factory=threading.Event)


def _chat_body(max_tokens: int, openai: bool, model: str = "") -> dict:
    if not openai:
        return {
            "instruction": "what is this digit ?",
            "image": png_b64(),
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + png_b64()}},
        {"type": "text", "text": "what is this digit ?"},
    ]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


def _read_chunk(record: StreamRecord, chunk: dict) -> None:
    if "error" in chunk:
        record.error = chunk["error"]["type"]
        return
    record.chunks += 1
    record.first.set()
    reason = chunk.get("finish_reason") or next(
        (c.get("finish_reason") for c in chunk.get("choices") or [] if c.get("finish_reason")), None
    )
    if reason:
        record.finish_reason = reason
    if chunk.get("usage"):
        record.tokens = chunk["usage"]["completion_tokens"]


def stream_chat(
    url: str, record: StreamRecord, max_tokens: int, openai: bool = False, model: str = ""
) -> None:
    """Stream one request (`/v1/chat`, or `/v1/chat/completions` when `openai`) and record what came back."""
    path = "/v1/chat/completions" if openai else "/v1/chat"
    try:
        with httpx.stream(
            "POST", url + path, json=_chat_body(max_tokens, openai, model), timeout=120
        ) as resp:
            record.status = resp.status_code
            for line in resp.iter_lines():
                if line == "data: [DONE]":
                    record.done = True
                elif line.startswith("data: "):
                    _read_chunk(record, json.loads(line[6:]))
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.first.set()


def start_streams(
    url: str, n: int, max_tokens: int, openai_share: int = 0
) -> tuple[list[StreamRecord], list[threading.Thread]]:
    """`n` streams in threads; the first `openai_share` of them use the OpenAI-compatible route."""
    records = [StreamRecord() for _ in range(n)]
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"] if openai_share else ""
    threads = [
        threading.Thread(target=stream_chat, args=(url, r, max_tokens, i < openai_share, model), daemon=True)
        for i, r in enumerate(records)
    ]
    for t in threads:
        t.start()
    return records, threads


def store_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under a store (lock files excluded: flock creates them on reads too)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file() and ".locks" not in p.parts
    }


def record_figure(test: str, **figures: object) -> None:
    """Append measured figures to the JSON-lines file named by `$M2PT_FAULT_FIGURES` (set by
    `bench/fault_suite.py`); a no-op otherwise."""
    path = os.environ.get("M2PT_FAULT_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, **figures}) + "\n")
