"""OpenAI-compatible routes: `POST /v1/chat/completions` and `GET /v1/models`.

- `model` names a bundle ("name" or "name@version") or the base model (its id as listed by `/v1/models`). An
  unknown bundle is a 404 in OpenAI's error shape, never a silent fallback to the base model.
- Messages carry plain string content or parts: `{"type": "text"}` and `{"type": "image_url", "image_url":
  {"url": "data:image/...;base64,..."}}`. They are passed to the engine in Hugging Face chat format (developer
  → system), images in order. The last message must be the user's, with text.
- `stream: true` gives `chat.completion.chunk` SSE events ending with `data: [DONE]`; with
  `stream_options.include_usage` a final chunk with empty `choices` carries the usage.
- `finish_reason` is the engine's: "stop", "length", or "timeout"/"abort" when the server cut the answer
  short. A request the model failed on is a 500 (`engine_error`), or, once streaming, an SSE error event
  before `[DONE]`.

The official `openai` Python client works against these routes unchanged (tested in tests/test_api_openai.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from server.api.deps import get_engine, get_settings, require_api_key
from server.api.errors import ApiError, describe_exception, error_body
from server.api.generation import (
    ClientDisconnected,
    EngineStream,
    build_sampling,
    check_text,
    check_unicode,
    decode_images,
    make_request,
    new_request_id,
    open_stream,
    set_metric_labels,
)
from server.api.model_cards import bundle_models
from server.api.protocol import ChatCompletionRequest, ChatMessage, ImagePart
from server.api.sse import DONE, EventStreamResponse, sse_data
from server.engine.types import StreamEvent
from server.settings import Settings

router = APIRouter(dependencies=[Depends(require_api_key)])


def convert_messages(
    messages: list[ChatMessage], settings: Settings
) -> tuple[list[dict[str, Any]], list[str]]:
    """OpenAI messages → (HF chat messages with `{"type": "image"}` placeholders, image references)."""
    if len(messages) > settings.max_messages:
        raise ApiError(f"{len(messages)} messages, over the limit of {settings.max_messages}")
    if messages[-1].role != "user":
        raise ApiError("the last message must be the user's (role 'user') question")
    converted: list[dict[str, Any]] = []
    images: list[str] = []
    for index, message in enumerate(messages):
        parts: list[dict[str, Any]] = []
        raw = message.content if isinstance(message.content, list) else [message.content or ""]
        for part in raw:
            if isinstance(part, ImagePart):
                images.append(part.image_url.url)
                parts.append({"type": "image"})
                continue
            text = part if isinstance(part, str) else part.text
            check_unicode(text, f"messages[{index}] text")
            if len(text) > settings.max_instruction_chars:
                raise ApiError(
                    f"messages[{index}] text is {len(text)} characters, over the limit of "
                    f"{settings.max_instruction_chars}; shorten it"
                )
            parts.append({"type": "text", "text": text})
        role = "system" if message.role == "developer" else message.role
        converted.append({"role": role, "content": parts})
    last_text = "".join(p["text"] for p in converted[-1]["content"] if p["type"] == "text")
    check_text(last_text, settings, "the last user message's text")
    return converted, images


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> dict | EventStreamResponse:
    settings = get_settings(request)
    engine = get_engine(request)
    bundle = None if body.model == engine.base_model_id else body.model
    messages, image_refs = convert_messages(body.messages, settings)
    sampling = build_sampling(
        settings,
        body.requested_max_tokens,
        body.temperature,
        body.top_p,
        body.seed,
        body.stop,
        body.ignore_eos,
    )
    images = await decode_images(image_refs, settings)
    request_id = new_request_id("chatcmpl")
    stream, first = await open_stream(
        request, engine, make_request(request_id, messages, images, bundle, sampling, settings)
    )
    created = int(time.time())
    model = first.bundle or engine.base_model_id
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _completion_chunks(
            request, stream, first, _ChunkMaker(request_id, created, model, include_usage)
        )
        return EventStreamResponse(events, stream)
    try:
        pieces, last = [first.text], first
        async for event in stream:
            pieces.append(event.text)
            last = event
    finally:
        await stream.aclose()
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(pieces), "refusal": None},
                "finish_reason": last.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(last),
    }


def _usage(event: StreamEvent) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


class _ChunkMaker:
    def __init__(self, request_id: str, created: int, model: str, include_usage: bool) -> None:
        self.request_id, self.created, self.model, self.include_usage = (
            request_id,
            created,
            model,
            include_usage,
        )

    def chunk(self, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        out = {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, event: StreamEvent) -> dict[str, Any]:
        return {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [],
            "usage": _usage(event),
        }


async def _completion_chunks(
    request: Request, stream: EngineStream, first: StreamEvent, maker: _ChunkMaker
) -> AsyncIterator[bytes]:
    yield sse_data(maker.chunk({"role": "assistant", "content": ""}, None))
    event: StreamEvent | None = first
    try:
        while event is not None:
            if event.text:
                yield sse_data(maker.chunk({"content": event.text}, None))
            if event.finish_reason is not None:
                yield sse_data(maker.chunk({}, event.finish_reason))
                if maker.include_usage:
                    yield sse_data(maker.usage_chunk(event))
            event = await stream.next()
    except ClientDisconnected:
        return
    except asyncio.CancelledError:
        set_metric_labels(request, status="499")
        raise
    except Exception as exc:  # the engine failed after the 200 was sent: report it in-band, OpenAI style
        status, error_type, message, _ = describe_exception(exc)
        set_metric_labels(request, status=str(status))
        yield sse_data(error_body(error_type, message))
    yield DONE


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """OpenAI model list: the base model, then every bundle by name (its latest version) and by name@version.
    `created` is the server's start for the base model and the publish time of a bundle version."""
    engine = get_engine(request)
    base = {
        "id": engine.base_model_id,
        "object": "model",
        "created": int(request.app.state.started_at),
        "owned_by": "m2pt",
    }
    store = getattr(request.app.state, "store", None)  # the app's store (server.api.deps.get_store)
    bundles = await run_in_threadpool(bundle_models, store, engine.base_model_id) if store is not None else []
    return {"object": "list", "data": [base, *bundles]}
