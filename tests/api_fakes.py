"""Test helpers for the HTTP layer: a deterministic fake engine, a real uvicorn server in a thread, test
images.

`FakeEngine` implements `server.engine.client.EngineClient` without a model: it answers "echo <last user
text>" (plus "image WxH" for each image) one word per event, can be slowed down (`delay_s`), made to raise
`QueueFullError`, or to fail mid-stream, and records which requests finished and which were closed early (a
client disconnect must close the iterator). With a `store` it resolves bundles through it (so unknown bundles
raise the store's 404); it keeps that store private, as the ops routes must use the app's own
(`create_app(..., store=, spec=)`). It lives in tests only.
"""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time

import uvicorn
from PIL import Image

from server.engine.errors import EngineError, QueueFullError
from server.engine.types import GenerationRequest, StreamEvent


class FakeEngine:
    def __init__(
        self,
        store=None,
        bundles=("colors",),
        delay_s: float = 0.0,
        base_model_id: str = "fake-base",
    ) -> None:
        self._store = store
        self.bundles = set(bundles)
        self.delay_s = delay_s
        self.queue_full = False
        self.fail_after: int | None = None  # raise an EngineError after this many events
        self.is_ready = True
        self._base_model_id = base_model_id
        self.requests: list[GenerationRequest] = []
        self.active: set[str] = set()
        self.finished: list[str] = []
        self.closed_early: list[str] = []

    @property
    def ready(self) -> bool:
        return self.is_ready

    @property
    def base_model_id(self) -> str:
        return self._base_model_id

    def _resolve(self, bundle: str | None) -> str | None:
        from prompts_store.errors import BundleNotFoundError

        if bundle is None:
            return None
        if self._store is not None:
            return self._store.resolve(bundle).label
        name, _, version = bundle.partition("@")
        if name not in self.bundles:
            raise BundleNotFoundError(f"no bundle named {name!r}")
        return f"{name}@{version or 'v1'}"

    @staticmethod
    def answer_words(request: GenerationRequest) -> list[str]:
        last = request.messages[-1]["content"]
        text = " ".join(p["text"] for p in last if p["type"] == "text")
        words = ["echo", *text.split()]
        words += [f"image {img.size[0]}x{img.size[1]}" for img in request.images]
        return words

    async def generate(self, request: GenerationRequest):
        if self.queue_full:
            raise QueueFullError("the request queue is full (fake engine); retry later", retry_after_s=2)
        label = self._resolve(request.bundle)
        self.requests.append(request)
        self.active.add(request.request_id)
        words = self.answer_words(request)
        count = min(len(words), request.sampling.max_tokens)
        done = False
        try:
            for i in range(count):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if self.fail_after is not None and i >= self.fail_after:
                    raise EngineError("the fake engine failed mid-stream")
                last = i == count - 1
                reason = ("stop" if count == len(words) else "length") if last else None
                text = words[i] if i == 0 else " " + words[i]
                yield StreamEvent(request.request_id, text, reason, 7, i + 1, label)
            done = True
        finally:
            self.active.discard(request.request_id)
            (self.finished if done else self.closed_early).append(request.request_id)


def png_bytes(size: tuple[int, int] = (16, 16), color=(200, 30, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def png_b64(size: tuple[int, int] = (16, 16)) -> str:
    return base64.b64encode(png_bytes(size)).decode()


def png_data_uri(size: tuple[int, int] = (16, 16)) -> str:
    return "data:image/png;base64," + png_b64(size)


class LiveServer:
    """A real uvicorn server for `app` on a free localhost port, run in a background thread."""

    def __init__(self, app) -> None:
        self.app = app
        self.port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
