"""What the HTTP layer needs from an engine. The real one is `server.engine.engine.Engine`; API tests may pass any
object with this shape to `create_app`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from server.engine.types import GenerationRequest, StreamEvent


class EngineClient(Protocol):
    @property
    def ready(self) -> bool:
        """True once the model is loaded and the decode loop runs."""

    @property
    def base_model_id(self) -> str:
        """The id under which the base model (no bundle) is listed in /v1/models."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Stream the completion of `request`.

        Raises before the first event: `prompts_store.errors.BundleNotFoundError` (unknown bundle, never a fallback
        to the base model), a bundle validation error, `QueueFullError`, `EngineNotReadyError`, `PromptTooLongError`.
        Closing the iterator early (client gone) aborts the request and frees its batch slot. The last event has
        `finish_reason` in `server.engine.types.FINISH_REASONS`; "error" (with `StreamEvent.error`) means the
        model failed on this request, which the API turns into a 5xx, never a 200.
        """
