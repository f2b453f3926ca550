"""The drain state of a graceful shutdown: whether a drain has begun, and how many requests are in flight.

Contract: `DrainMiddleware` (`server.api.middleware`) calls `enter()` / `leave()` around every non-public
request; `begin()` (called by the shutdown handler, `server.api.shutdown`) flips `draining`, after which the
middleware answers new requests 503 with `Retry-After` and `/ready` answers 503; `wait_idle(timeout)` returns
True as soon as nothing is in flight, False when the timeout passes first. Everything runs on the event loop
thread; nothing here stops the engine or the HTTP server.
"""

from __future__ import annotations

import asyncio


class DrainState:
    def __init__(self, retry_after_s: int = 5) -> None:
        self.draining = False
        self.in_flight = 0
        self.retry_after_s = retry_after_s
        self._idle: asyncio.Event | None = None

    def begin(self) -> None:
        """Refuse new requests from now on (idempotent)."""
        self.draining = True

    def enter(self) -> None:
        self.in_flight += 1
        if self._idle is not None:
            self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight (True) or `timeout_s` passed (False)."""
        if self.in_flight == 0:
            return True
        self._idle = self._idle or asyncio.Event()
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return self.in_flight == 0
        return True
