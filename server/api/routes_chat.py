"""`POST /v1/chat`: one instruction (+ an optional image) answered by the base model or a named bundle.

Request: `server.api.protocol.ChatRequest`. Answer: `{"id", "bundle", "text", "finish_reason", "usage":
{"prompt_tokens", "completion_tokens"}}`, `bundle` being the resolved "name@version" (null for the base
model). With `"stream": true` the answer is SSE: one `data: {"id", "bundle", "text": <delta>, "finish_reason":
null}` per piece, the last carrying `finish_reason` and `usage`, then `data: [DONE]`. An error after streaming
began (a model failure included) is sent as `data: {"error": {...}}` before `[DONE]`.

The route is thin: check, decode the image in a worker thread, build a `GenerationRequest`, relay engine
events. It never falls back to the base model when a named bundle is unknown (the engine's 404 is passed on).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request

from server.api.deps import get_engine, get_settings, require_api_key
from server.api.errors import describe_exception, error_body
from server.api.generation import (
    ClientDisconnected,
    EngineStream,
    build_sampling,
    check_text,
    decode_images,
    make_request,
    new_request_id,
    open_stream,
    set_metric_labels,
)
from server.api.protocol import ChatRequest, ChatResponse, Usage
from server.api.sse import DONE, EventStreamResponse, sse_data
from server.engine.types import StreamEvent

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat", response_model=None)
async def chat(body: ChatRequest, request: Request) -> ChatResponse | EventStreamResponse:
    settings = get_settings(request)
    engine = get_engine(request)
    check_text(body.instruction, settings, "instruction")
    sampling = build_sampling(
        settings, body.max_tokens, body.temperature, body.top_p, body.seed, body.stop, body.ignore_eos
    )
    images = await decode_images([body.image] if body.image is not None else [], settings)
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": body.instruction}]
    request_id = new_request_id("chat")
    gen_request = make_request(
        request_id, [{"role": "user", "content": content}], images, body.bundle, sampling, settings
    )
    stream, first = await open_stream(request, engine, gen_request)
    if body.stream:
        return EventStreamResponse(_chat_events(request, stream, first), stream)
    try:
        text, last = await _collect(stream, first)
    finally:
        await stream.aclose()
    return ChatResponse(
        id=request_id,
        bundle=last.bundle,
        text=text,
        finish_reason=last.finish_reason,
        usage=Usage(prompt_tokens=last.prompt_tokens, completion_tokens=last.completion_tokens),
    )


async def _collect(stream: EngineStream, first: StreamEvent) -> tuple[str, StreamEvent]:
    pieces = [first.text]
    last = first
    async for event in stream:
        pieces.append(event.text)
        last = event
    return "".join(pieces), last


def _chunk(event: StreamEvent) -> dict:
    chunk = {
        "id": event.request_id,
        "bundle": event.bundle,
        "text": event.text,
        "finish_reason": event.finish_reason,
    }
    if event.finish_reason is not None:
        chunk["usage"] = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens}
    return chunk


async def _chat_events(request: Request, stream: EngineStream, first: StreamEvent) -> AsyncIterator[bytes]:
    event: StreamEvent | None = first
    try:
        while event is not None:
            yield sse_data(_chunk(event))
            event = await stream.next()
    except ClientDisconnected:
        return
    except asyncio.CancelledError:
        set_metric_labels(request, status="499")
        raise
    except Exception as exc:  # the engine failed after the 200 was sent: report it in-band
        status, error_type, message, _ = describe_exception(exc)
        set_metric_labels(request, status=str(status))
        yield sse_data(error_body(error_type, message))
    yield DONE
