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


def stream_chat(url: str, record: StreamRecord, max_tokens: int, bundle: str | None = None) -> None:
    body = {
        "instruction": "what is this digit ?",
        "image": png_b64(),
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "bundle": bundle,
    }
    try:
        with httpx.stream("POST", url + "/v1/chat", json=body, timeout=120) as resp:
            record.status = resp.status_code
            for line in resp.iter_lines():
                if line == "data: [DONE]":
                    record.done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        record.error = chunk["error"]["type"]
                        continue
                    record.chunks += 1
                    record.first.set()
                    if chunk.get("finish_reason"):
                        record.finish_reason = chunk["finish_reason"]
                        record.tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    finally:
        record.first.set()


def start_streams(url: str, n: int, max_tokens: int) -> tuple[list[StreamRecord], list[threading.Thread]]:
    records = [StreamRecord() for _ in range(n)]
    threads = [threading.Thread(target=stream_chat, args=(url, r, max_tokens), daemon=True) for r in records]
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
