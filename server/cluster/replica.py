"""`EngineReplica`: one Ray Serve replica = one process = one frozen model + our `Engine` (mixed-bundle
continuous batching inside the replica). `server.cluster.launch` turns the class into a Serve deployment.

Methods the ingress calls through its `DeploymentHandle`:
- `generate(request, routing_key)` (streaming): the engine's `StreamEvent`s; a failure is yielded as one final
  `ReplicaError` already mapped to the API's status/type/message (never a Ray traceback). `request.bundle` is
  the exact "name@version" the ingress resolved, so the replica cannot serve another version than the one
  routed on; it reads the bundle from the shared store itself (a version deleted meanwhile answers 404).
- `describe()`: the served model id and `ModelSpec` (the ingress validates uploads against it).
Ray calls `record_routing_stats()` periodically: this replica's id, pid, resident bundles (content hash ->
label) and its Prometheus text; the affinity router and the ingress `/metrics` read it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from server.cluster import engine_adapter
from server.cluster.protocol import ReplicaError
from server.engine.types import GenerationRequest

log = logging.getLogger(__name__)


def _replica_id() -> str:
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


class EngineReplica:
    """See the module contract. `settings` is the server's `Settings` (the same for every replica)."""

    async def __init__(self, settings) -> None:
        from prometheus_client import Counter

        from server.metrics import ServerMetrics

        self._metrics = ServerMetrics()
        self._routed = Counter(
            "m2pt_cluster_routed_requests",
            "Requests this replica received, by bundle and whether the bundle was already resident here",
            ["bundle", "resident"],
            registry=self._metrics.registry,
        )
        self._id = _replica_id()
        self._engine = await engine_adapter.build_engine(settings, self._metrics)
        log.info("replica %s (pid %d) serving %s", self._id, os.getpid(), self.describe()["model_id"])

    def describe(self) -> dict[str, Any]:
        return {
            "model_id": engine_adapter.served_model_id(self._engine),
            "spec": engine_adapter.served_spec(self._engine),
            "replica": self._id,
            "pid": os.getpid(),
        }

    async def generate(self, request: GenerationRequest, routing_key: str) -> AsyncIterator[Any]:
        from server.api.errors import describe_exception

        resident = bool(routing_key) and engine_adapter.is_resident(self._engine, routing_key)
        self._routed.labels(request.bundle or "none", "true" if resident else "false").inc()
        # Deadlines are measured on this host's monotonic clock from arrival here.
        request = dataclasses.replace(request, arrival=time.monotonic())
        events = engine_adapter.stream(self._engine, request)
        try:
            async for event in events:
                yield event
        except Exception as exc:  # mapped here so the ingress never sees Ray's wrapping of it
            status, error_type, message, headers = describe_exception(exc)
            retry = headers.get("Retry-After")
            yield ReplicaError(status, error_type, message, int(retry) if retry else None)
        finally:
            await events.aclose()

    def record_routing_stats(self) -> dict[str, Any]:
        return {
            "replica": self._id,
            "pid": os.getpid(),
            "resident": engine_adapter.resident_bundles(self._engine),
            "metrics": self._metrics.render().decode("utf-8"),
            "at": time.time(),
        }

    def check_health(self) -> None:
        if not self._engine.ready:
            raise RuntimeError("engine loop is not running")
