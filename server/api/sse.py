"""Server-sent events: the `data: <json>\\n\\n` framing, the `data: [DONE]` terminator, and a streaming
response that always closes its engine stream.

`EventStreamResponse` closes the `EngineStream` when the response ends for ANY reason (finished, client gone,
cancelled before the first byte), so a streamed request can never keep its batch slot. It formats no payloads;
the routes build the JSON of each chunk.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.generation import EngineStream

DONE = b"data: [DONE]\n\n"


def sse_data(payload: Any) -> bytes:
    """One SSE event carrying `payload` as compact JSON."""
    return (
        b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8") + b"\n\n"
    )


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes], stream: EngineStream) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._engine_stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._engine_stream.aclose()
