"""Pure ASGI middleware: authentication before the body is read, the request-body size cap, per-request
metrics, and the drain gate of a graceful shutdown.

`AuthBeforeBodyMiddleware` runs the chat routes' API-key check on the headers alone, before anything reads
the body, so an unauthenticated request gets 401 whatever its body holds (malformed JSON included). The
router-level dependency (`server.api.deps`) stays as the second line of defence.

`DrainMiddleware` counts the requests in flight (`server.api.drain.DrainState`); once a drain has begun
(SIGTERM) it answers every new non-public request 503 with `Retry-After` and `Connection: close`, while the
ones already in flight run to their end.

`BodyLimitMiddleware` enforces the cap BEFORE the body is parsed: a declared `Content-Length` over the cap is
answered 413 without reading a byte; a body streamed without one (chunked) is counted as it arrives and the
read fails with `PayloadTooLargeError` (413) the moment it passes the cap, so nothing larger than the cap is
ever buffered. Bundle uploads (`POST /v1/bundles`) get their own, larger cap. Being pure ASGI (no
`BaseHTTPMiddleware`), it keeps `receive` intact for disconnect detection.

`RequestMetricsMiddleware` counts each finished chat request in `m2pt_requests{bundle, status}`. Routes report
the resolved bundle ("name@version", or "none" for the base model) and any status the HTTP status line cannot
show (499 when the client went away, the error status of a stream that failed mid-way) through
`scope["state"]`; requests that fail before a bundle is resolved are counted under bundle "unknown"
(client-chosen names never become labels).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.drain import DrainState
from server.api.errors import ApiError, PayloadTooLargeError, error_body

STATE_BUNDLE = "m2pt_bundle"
STATE_STATUS = "m2pt_status"


class BodyLimitMiddleware:
    def __init__(
        self, app: ASGIApp, default_limit: int, upload_limit: int, upload_paths: frozenset[str]
    ) -> None:
        self.app = app
        self.default_limit = default_limit
        self.upload_limit = upload_limit
        self.upload_paths = upload_paths

    def _limit_for(self, scope: Scope) -> int:
        if scope.get("method") == "POST" and scope.get("path") in self.upload_paths:
            return self.upload_limit
        return self.default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit_for(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_json(send, 413, error_body("payload_too_large", PayloadTooLargeError(limit).detail))
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLargeError(limit)
            return message

        await self.app(scope, limited_receive, send)


class AuthBeforeBodyMiddleware:
    """Run `check(request)` (headers only; raises `ApiError`) for requests to `paths` before the app sees
    them."""

    def __init__(self, app: ASGIApp, check: Callable[[Request], None], paths: frozenset[str]) -> None:
        self.app = app
        self.check = check
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path") in self.paths:
            try:
                self.check(Request(scope))
            except ApiError as exc:
                await _send_json(send, exc.status, error_body(exc.error_type, exc.message), exc.headers)
                return
        await self.app(scope, receive, send)


class DrainMiddleware:
    """Count in-flight requests; during a drain answer new ones (except `public_paths`) 503 + Retry-After."""

    def __init__(self, app: ASGIApp, state: DrainState, public_paths: frozenset[str]) -> None:
        self.app = app
        self.state = state
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.public_paths:
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            body = error_body(
                "shutting_down", "the server is shutting down; retry on another replica or later"
            )
            await _send_json(send, 503, body, {"Retry-After": str(self.state.retry_after_s)})
            return
        self.state.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.leave()


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics, paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        status = {"code": 500}

        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            code = state.get(STATE_STATUS) or str(status["code"])
            self.metrics.requests.labels(bundle=state.get(STATE_BUNDLE, "unknown"), status=code).inc()


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else None
    return None


async def _send_json(send: Send, status: int, body: dict, extra: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
    ]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
