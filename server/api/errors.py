"""One place that turns every failure into `{"error": {"type", "message"}}` with the right HTTP status.

Mapped here:
- `ApiError` (this module; raised by routes and auth): its own `status`, `error_type`, `headers`;
- the image errors of `server.image_errors` (plain exceptions, no HTTP in them): `DOMAIN_ERRORS` gives each its
  status and type;
- `server.engine.errors.EngineError` (429/503 get `Retry-After`) and `prompts_store.errors.BundleError` (404
  unknown bundle, 400/413/422 bad bundle, 409 conflict): both carry `status` and `error_type`;
- FastAPI's `RequestValidationError` (schema violations) → 400 with the field path and what is wrong;
- Starlette's `HTTPException` (unknown route 404, wrong method 405, 413 from the body limit) → same status;
- anything else → 500 "internal error" (details are logged, never sent: no tracebacks or library text to
  clients).

Every message sent is cut to `MAX_MESSAGE_CHARS` (error bodies and in-band SSE errors alike).
Engine and bundle errors carry their own status; the image errors get theirs here.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.errors import EngineError
from server.image_errors import ImageError, ImageTooLargeError, RemoteImageRefusedError

log = logging.getLogger(__name__)

# Statuses whose answers tell the client to come back later.
RETRY_STATUSES = (429, 503)

# Domain errors without an HTTP status of their own: (class, status, error type), most specific class first.
DOMAIN_ERRORS: tuple[tuple[type[Exception], int, str], ...] = (
    (ImageTooLargeError, 413, "image_too_large"),
    (RemoteImageRefusedError, 400, "remote_image_refused"),
    (ImageError, 400, "invalid_image"),
)


class ApiError(Exception):
    """An error of the HTTP layer with its status and stable machine-readable type."""

    status = 400
    error_type = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type
        self.headers = headers or {}


class AuthError(ApiError):
    status = 401
    error_type = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ForbiddenError(ApiError):
    status = 403
    error_type = "forbidden"


class PayloadTooLargeError(StarletteHTTPException):
    """The request body is over its cap. A Starlette HTTPException on purpose: FastAPI re-raises those from
    body parsing unchanged (any other exception there would become a generic 400)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes; send a smaller body")
        self.limit = limit


MAX_MESSAGE_CHARS = 1000


def bounded_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` cut to at most `limit` characters: no error body echoes unbounded client content."""
    if len(message) <= limit:
        return message
    marker = " ... (message truncated)"
    return message[: limit - len(marker)] + marker


def error_body(error_type: str, message: str) -> dict[str, Any]:
    """The error shape; the message is bounded (`bounded_message`)."""
    return {"error": {"type": error_type, "message": bounded_message(message)}}


def error_response(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one error shape. 429/503 always carry `Retry-After`."""
    headers = dict(headers or {})
    if status in RETRY_STATUSES:
        headers.setdefault("Retry-After", "1")
    safe = message.encode("utf-8", "backslashreplace").decode("utf-8")  # never fail on odd characters
    safe = bounded_message(safe)
    return JSONResponse(error_body(error_type, safe), status_code=status, headers=headers)


def describe_exception(exc: BaseException) -> tuple[int, str, str, dict[str, str]]:
    """(status, type, message, headers) for any exception; unknown ones become an opaque 500."""
    if isinstance(exc, ApiError):
        return exc.status, exc.error_type, exc.message, exc.headers
    for kind, status, error_type in DOMAIN_ERRORS:
        if isinstance(exc, kind):
            return status, error_type, str(exc), {}
    if isinstance(exc, EngineError) or _is_bundle_error(exc):
        headers = {}
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, int(retry_after)))
        return int(exc.status), str(exc.error_type), str(exc) or exc.error_type, headers
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code, _http_error_type(exc.status_code), str(exc.detail), dict(exc.headers or {})
    log.error("unhandled error", exc_info=(type(exc), exc, exc.__traceback__))
    return 500, "internal_error", "internal server error (logged on the server)", {}


def _is_bundle_error(exc: BaseException) -> bool:
    try:
        from prompts_store.errors import BundleError
    except ImportError:  # the store package is optional for the HTTP layer's own tests
        return False
    return isinstance(exc, BundleError)


def _http_error_type(status: int) -> str:
    types = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    return types.get(status, "http_error")


def validation_message(exc: RequestValidationError) -> str:
    """A short, input-free description of the first few schema violations: `field.path: what is wrong`."""
    parts = []
    for err in exc.errors()[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        kind = err.get("type")
        if kind == "extra_forbidden":
            msg = "unknown field (not part of this API; remove it)"
        elif kind == "json_invalid":
            msg = "request body is not valid JSON"
        elif not loc and kind == "missing":
            msg = "request body is missing; send a JSON object with Content-Type: application/json"
        elif not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
            msg = "request body must be a JSON object sent with Content-Type: application/json"
        parts.append(f"{where}: {msg}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


async def _handle_any(request: Request, exc: Exception) -> JSONResponse:
    status, error_type, message, headers = describe_exception(exc)
    return error_response(status, error_type, message, headers)


async def _handle_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(400, "invalid_request", validation_message(exc))


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on `app` (validation, HTTP, ours, engine, bundle, and the 500 fallback)."""
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(StarletteHTTPException, _handle_any)
    app.add_exception_handler(ApiError, _handle_any)
    app.add_exception_handler(EngineError, _handle_any)
    for kind, _, _ in DOMAIN_ERRORS:
        app.add_exception_handler(kind, _handle_any)
    try:
        from prompts_store.errors import BundleError
    except ImportError:
        BundleError = None  # noqa: N806
    if BundleError is not None:
        app.add_exception_handler(BundleError, _handle_any)
    app.add_exception_handler(Exception, _handle_any)
