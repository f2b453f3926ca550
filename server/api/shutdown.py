"""Graceful shutdown of `m2pt serve`: a uvicorn `Server` whose signal handling drains before it exits.

Contract (SIGTERM or SIGINT):
- first signal: the app's `DrainState` (`app.state.drain`) begins a drain: `/ready` answers 503, new requests
  get 503 with `Retry-After` (the listener stays open, so load balancers see the 503s rather than refused
  connections), requests in flight run on. When none is left, or after `timeout_s`, whichever comes first,
  the requests still running are cut through the engine's public `stop()` (each ends with finish_reason
  "abort", streams get their final chunk and `[DONE]`), then uvicorn shuts down as usual (lifespan shutdown
  included) and the process exits with status 0.
- second signal (forced quit): one log line, the requests in flight are cut at once the same way, then the
  normal shutdown; a third signal makes uvicorn skip its own waiting too.
Exit status 0 in every case (the signal is not re-raised after the shutdown, unlike plain uvicorn).

Only the HTTP layer's drain state and the engine's `stop()` are used; nothing in `server.engine` knows about
signals.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn

from server.api.drain import DrainState

log = logging.getLogger(__name__)

ABORT_GRACE_S = 5.0  # after cutting the requests, how long their handlers get to send the final events


class GracefulServer(uvicorn.Server):
    """`uvicorn.Server` for an app built by `server.app.create_app` (it reads `app.state.drain/engine`)."""

    def __init__(self, config: uvicorn.Config, app: Any, timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.timeout_s = timeout_s
        self.signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def drain(self) -> DrainState:
        return self.app.state.drain

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler (main thread): hand the work to the event loop."""
        self.signals += 1
        if self._loop is None or not self.started:  # still starting up: stop as soon as startup ends
            self.should_exit = True
            return
        if self.signals >= 3:
            self.force_exit = self.should_exit = True
            return
        step = self._drain if self.signals == 1 else self._forced_quit
        self._loop.call_soon_threadsafe(self._spawn, step, signal.Signals(sig).name)

    def _spawn(self, step: Any, sig_name: str) -> None:
        task = asyncio.ensure_future(step(sig_name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, sig_name: str) -> None:
        self.drain.begin()
        log.info(
            "%s: draining %d request(s) in flight (up to %.1f s); new requests get 503, /ready answers 503",
            sig_name,
            self.drain.in_flight,
            self.timeout_s,
        )
        if not await self.drain.wait_idle(self.timeout_s):
            log.warning(
                "shutdown timeout of %.1f s passed: cutting %d request(s) in flight (finish_reason abort)",
                self.timeout_s,
                self.drain.in_flight,
            )
            await self._cut_in_flight()
        self.should_exit = True

    async def _forced_quit(self, sig_name: str) -> None:
        log.warning(
            "%s again: forced quit, cutting %d request(s) in flight (finish_reason abort)",
            sig_name,
            self.drain.in_flight,
        )
        self.drain.begin()
        await self._cut_in_flight()
        self.should_exit = True

    async def _cut_in_flight(self) -> None:
        """End every running request through the engine's public `stop()`, then let the handlers finish."""
        stop = getattr(getattr(self.app.state, "engine", None), "stop", None)
        if stop is not None and self.drain.in_flight:
            try:
                await asyncio.wait_for(stop(), ABORT_GRACE_S)
            except TimeoutError:
                log.warning("the engine did not stop within %.1f s", ABORT_GRACE_S)
        await self.drain.wait_idle(ABORT_GRACE_S)
