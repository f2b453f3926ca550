"""Errors the engine raises to the HTTP layer, each with the status it maps to (the API layer turns them into
`{"error": {"type", "message"}}`). Bundle errors come from `prompts_store.errors` and carry their own status."""

from __future__ import annotations


class EngineError(Exception):
    """Base class: `status` is the HTTP status, `error_type` the stable machine-readable type."""

    status = 500
    error_type = "engine_error"


class QueueFullError(EngineError):
    """The waiting queue is at its bound; the client should retry after `retry_after_s`."""

    status = 429
    error_type = "queue_full"

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineNotReadyError(EngineError):
    status = 503
    error_type = "not_ready"


class PromptTooLongError(EngineError):
    """The tokenised prompt (plus max_tokens) does not fit the model's context."""

    status = 400
    error_type = "prompt_too_long"


class InvalidRequestError(EngineError):
    """The request is malformed in a way only the engine can see (e.g. image parts and images do not match)."""

    status = 400
    error_type = "invalid_request"


class RequestFailedError(EngineError):
    """The model failed on this request after it was accepted (finish reason "error"): a server fault, never
    the client's. Others in the same batch are unaffected."""

    status = 500
    error_type = "engine_error"
