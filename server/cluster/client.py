"""`ClusterEngine`: the `EngineClient` the ingress app is built with; it forwards each request to an engine
replica through a Ray Serve `DeploymentHandle` routed by `BundleAffinityRouter`.

Per request: resolve the bundle in the shared store here (unknown -> 404 before anything is routed), pass the
resolved "name@version" and its content hash (the routing key) to a replica, relay its events.
- A replica's own errors arrive as `ReplicaError` and are raised as `RemoteEngineError` with the replica's
  status/type/message (404, 429 + Retry-After, 400 ...).
- Ray's handle queue is bounded (`max_queued_requests`): beyond it Ray's `BackPressureError` becomes our
  `QueueFullError` (429 + Retry-After).
- A replica that dies before the request's first event: the request is sent again (up to `max_retries`
  times), the router only sees live replicas. After the first event (the client may already have bytes) it
  ends with `ReplicaLostError` (503): a stream gets an SSE error event, a non-streamed request a JSON 503.
Closing the iterator cancels the replica call, which aborts the request in that replica's engine.
`store`, `spec` and `bundle_limits` serve the ops routes: an upload is validated here once against the
served model and published once into the shared store, which every replica reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator

from server.cluster.protocol import ROUTING_KEY_NONE, RemoteEngineError, ReplicaError, ReplicaLostError
from server.engine.errors import EngineNotReadyError, QueueFullError
from server.engine.types import GenerationRequest, StreamEvent

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ClusterCounters:
    retried: int = 0
    lost_after_start: int = 0
    backpressure: int = 0


class ClusterEngine:
    """Implements `server.engine.client.EngineClient` over a handle to the `EngineReplica` deployment."""

    def __init__(
        self,
        handle,
        store,
        spec,
        model_id: str,
        bundle_limits,
        max_retries: int = 2,
        send_routing_key: bool = True,
    ) -> None:
        self._handle = handle
        self.store = store
        self.spec = spec
        self.bundle_limits = bundle_limits
        self._model_id = model_id
        self._max_retries = max_retries
        self._send_routing_key = send_routing_key  # False with Ray's default router (no multiplexing there)
        self.counters = ClusterCounters()
        self._stopping = False

    @property
    def ready(self) -> bool:
        return not self._stopping

    @property
    def base_model_id(self) -> str:
        return self._model_id

    def stop(self) -> None:
        self._stopping = True

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
        if self._stopping:
            raise EngineNotReadyError("the cluster is shutting down; retry on another endpoint")
        ref = await asyncio.to_thread(self.store.resolve, request.bundle) if request.bundle else None
        routed = dataclasses.replace(request, bundle=None if ref is None else ref.label)
        key = ROUTING_KEY_NONE if ref is None else ref.content_hash
        attempt = 0
        while True:
            started = False
            try:
                async for event in self._stream_once(routed, key):
                    started = True
                    yield event
                    if event.finish_reason is not None:
                        return
                raise ReplicaLostError("the replica ended the request without a final event; retry")
            except _ReplicaGone as gone:
                if started or attempt >= self._max_retries:
                    self.counters.lost_after_start += 1
                    raise ReplicaLostError(
                        "the replica serving this request stopped; retry the request"
                    ) from gone.__cause__
                attempt += 1
                self.counters.retried += 1
                log.warning("replica lost before %s started (%s); retrying", request.request_id, gone)

    async def _stream_once(self, request: GenerationRequest, key: str) -> AsyncIterator[StreamEvent]:
        from ray.exceptions import RayError
        from ray.serve.exceptions import BackPressureError

        routing = {"multiplexed_model_id": key} if self._send_routing_key else {}
        responses = self._handle.options(stream=True, **routing).generate.remote(request, key)
        try:
            async for item in responses:
                if isinstance(item, ReplicaError):
                    raise RemoteEngineError(item)
                yield item
        except BackPressureError:
            self.counters.backpressure += 1
            raise QueueFullError("all replicas are busy and the cluster queue is full; retry later") from None
        except RayError as exc:
            raise _ReplicaGone(type(exc).__name__) from exc
        finally:
            responses.cancel()


class _ReplicaGone(Exception):
    """Internal: the Ray call failed (replica died or became unreachable)."""
