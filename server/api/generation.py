"""What the chat routes share: settings-dependent input checks, image decoding off the event loop, building
the engine request, and `EngineStream`, which races every engine event against the client's disconnect.

`EngineStream` contract: `open_stream` calls `engine.generate` and waits for the FIRST event, so the errors
the engine raises before generating (unknown bundle 404, queue full 429, not ready 503, bad bundle 4xx) reach
the error handler while an HTTP status can still be sent. If the client disconnects first — while queued or
mid-answer — the wait ends with `ClientDisconnected` (recorded as status 499). An engine event with finish
reason "error" is raised as `RequestFailedError` (500): before the first event that is a JSON error, after it
the routes send an SSE error event and `[DONE]`, so a failed request is never a 200 success. `aclose()`
(whatever happens) closes the engine iterator (shielded from cancellation), which aborts the request and frees
its batch slot.
This module formats no responses; `routes_chat` and `routes_openai` do.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from server.api.errors import ApiError
from server.api.middleware import STATE_BUNDLE, STATE_STATUS
from server.engine.errors import RequestFailedError
from server.engine.types import FINISH_ERROR, GenerationRequest, SamplingParams, StreamEvent
from server.images import load_image
from server.settings import Settings


class ClientDisconnected(ApiError):
    status = 499
    error_type = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("the client closed the connection before the answer was complete")


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_unicode(text: str, what: str) -> None:
    """Refuse text that cannot be encoded as UTF-8 (lone surrogates from `\\ud800` JSON escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(f"{what} contains invalid Unicode (a lone surrogate); send valid UTF-8 text") from None


def check_text(text: str, settings: Settings, what: str) -> None:
    """Instructions and message texts: valid Unicode, not blank, at most `max_instruction_chars`."""
    check_unicode(text, what)
    if not text.strip():
        raise ApiError(f"{what} is empty; send the question or instruction as text")
    if len(text) > settings.max_instruction_chars:
        raise ApiError(
            f"{what} is {len(text)} characters, over the limit of {settings.max_instruction_chars}; "
            "shorten it"
        )


def build_sampling(
    settings: Settings,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    stop: str | Sequence[str] | None,
    ignore_eos: bool = False,
) -> SamplingParams:
    """Sampling parameters under the server's caps (`max_tokens_limit`, `max_stop_strings`)."""
    if max_tokens is None:
        max_tokens = settings.effective_default_max_tokens
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(f"max_tokens {max_tokens} is over this server's limit of {settings.max_tokens_limit}")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > settings.max_stop_strings:
        raise ApiError(f"{len(stops)} stop strings, over the limit of {settings.max_stop_strings}")
    if any(not s or len(s) > 128 for s in stops):
        raise ApiError("stop strings must be 1 to 128 characters long")
    for stop_string in stops:
        check_unicode(stop_string, "a stop string")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=0.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        seed=seed,
        stop=stops,
        ignore_eos=bool(ignore_eos),
    )


async def decode_images(references: Sequence[str], settings: Settings) -> list[Any]:
    """Decode every image reference in a worker thread (CPU work stays off the event loop)."""
    if len(references) > settings.max_images_per_request:
        raise ApiError(
            f"{len(references)} images in one request, over the limit of {settings.max_images_per_request}"
        )
    return [await run_in_threadpool(load_image, ref, settings) for ref in references]


def make_request(
    request_id: str,
    messages: list[dict[str, Any]],
    images: list[Any],
    bundle: str | None,
    sampling: SamplingParams,
    settings: Settings,
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        messages=messages,
        images=images,
        bundle=bundle,
        sampling=sampling,
        timeout_s=settings.request_timeout_s,
    )


def set_metric_labels(request: Request, *, bundle: str | None = None, status: str | None = None) -> None:
    """Tell `RequestMetricsMiddleware` the resolved bundle and/or a status the status line cannot carry."""
    if bundle is not None:
        request.scope.setdefault("state", {})[STATE_BUNDLE] = bundle
    if status is not None:
        request.scope.setdefault("state", {})[STATE_STATUS] = status


async def _anext(events: AsyncIterator[StreamEvent]) -> StreamEvent:
    return await events.__anext__()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class EngineStream:
    """The events of one engine request; see the module contract. Not reusable after `aclose()`."""

    def __init__(self, request: Request, events: AsyncIterator[StreamEvent]) -> None:
        self._request = request
        self._events = events
        self._watcher = asyncio.ensure_future(_wait_for_disconnect(request))
        self._finished = False
        self._closed = False

    async def next(self) -> StreamEvent | None:
        """The next event, None after the final one; `ClientDisconnected` if the client went away first."""
        if self._finished:
            return None
        step = asyncio.ensure_future(_anext(self._events))
        try:
            await asyncio.wait({step, self._watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            await _cancel(step)
            raise
        if not step.done():
            await _cancel(step)
            set_metric_labels(self._request, status="499")
            raise ClientDisconnected()
        try:
            event = step.result()
        except StopAsyncIteration:
            self._finished = True
            return None
        if event.finish_reason is not None:
            self._finished = True
        if event.finish_reason == FINISH_ERROR:
            raise RequestFailedError(
                f"{event.error or 'the model failed on this request'}; it was not retried"
            )
        return event

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        while (event := await self.next()) is not None:
            yield event

    async def aclose(self) -> None:
        """Close the engine iterator (aborting the request if it is still running) and stop watching."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            self._watcher.cancel()
            close = getattr(self._events, "aclose", None)
            if close is not None:
                await close()


async def _cancel(task: asyncio.Future) -> None:
    with anyio.CancelScope(shield=True):
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            task.exception()  # retrieved, so asyncio does not log it as never retrieved


async def open_stream(
    request: Request, engine, gen_request: GenerationRequest
) -> tuple[EngineStream, StreamEvent]:
    """Start generating and return the stream with its first event (engine errors propagate from here)."""
    stream = EngineStream(request, engine.generate(gen_request))
    try:
        first = await stream.next()
    except BaseException:
        await stream.aclose()
        raise
    if first is None:
        await stream.aclose()
        raise RuntimeError("the engine ended a request without a final event")
    set_metric_labels(request, bundle=first.bundle or "none")
    return stream, first
