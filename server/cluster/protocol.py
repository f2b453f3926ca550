"""Plain data between the ingress and the engine replicas (pickled by Ray; no Ray import here).

A replica's stream yields `server.engine.types.StreamEvent`s and, instead of raising, ends with one
`ReplicaError` when the request fails: its status, type and message are already the API's (mapped by
`server.api.errors.describe_exception` in the replica), so no Ray exception text or traceback ever reaches a
client.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.errors import EngineError

ROUTING_KEY_NONE = ""  # requests without a bundle


@dataclass(frozen=True)
class ReplicaError:
    status: int
    error_type: str
    message: str
    retry_after_s: int | None = None


class RemoteEngineError(EngineError):
    """An error a replica reported; carries the replica's mapping of it."""

    def __init__(self, error: ReplicaError) -> None:
        super().__init__(error.message)
        self.status = error.status
        self.error_type = error.error_type
        if error.retry_after_s is not None:
            self.retry_after_s = error.retry_after_s


class ReplicaLostError(EngineError):
    """The replica serving a request died after the request started (or no replica could take it)."""

    status = 503
    error_type = "replica_lost"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
