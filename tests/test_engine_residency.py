"""Bundle residency without a model: concurrent cold acquires share one load per bundle, and at most
`max_loading` loads run at once (a burst of cold bundles must not put several threads of torch work beside the
engine loop)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from server.engine.bundles import BundleResidency


@dataclass(frozen=True)
class Ref:
    content_hash: str
    label: str


class Prefix:
    def nbytes(self) -> int:
        return 1024


class CountingLoader:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.calls: list[str] = []

    def __call__(self, ref: Ref) -> Prefix:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.calls.append(ref.content_hash)
        time.sleep(0.02)
        with self.lock:
            self.running -= 1
        return Prefix()


@pytest.mark.parametrize("max_loading", [1, 3])
def test_cold_loads_are_bounded_and_shared(max_loading):
    loader = CountingLoader()
    residency = BundleResidency(loader, capacity=32, max_loading=max_loading)
    refs = [Ref(f"sha256:{i % 6}", f"b{i % 6}@v1") for i in range(18)]  # 6 bundles, 3 requests each

    async def burst():
        return await asyncio.gather(*(residency.acquire(ref) for ref in refs))

    entries = asyncio.run(burst())
    assert loader.most == max_loading, "cold loads must run at most max_loading at a time (and use them)"
    assert sorted(loader.calls) == sorted({r.content_hash for r in refs}), "one load per bundle"
    assert [e.content_hash for e in entries] == [r.content_hash for r in refs]
    assert all(e.pins == 3 for e in {id(e): e for e in entries}.values())
    # a second event loop (a new semaphore, not one bound to the closed loop): warm ones load no more
    refs += [Ref(f"sha256:new{i % 2}", f"n{i % 2}@v1") for i in range(6)]
    entries_again = asyncio.run(burst())
    assert len(loader.calls) == 8 and entries_again[0] is entries[0]
    assert loader.most == max_loading


def test_max_loading_must_be_positive():
    with pytest.raises(ValueError, match="max_loading"):
        BundleResidency(CountingLoader(), max_loading=0)
