"""`ClusterEngine` against a fake Serve handle (no Ray cluster is started; the `ray` package of the cluster
extra gives the exception types, like the real thing): retries before the first event, replica loss after
it, error mapping. Marked `cluster` (it needs the extra); takes seconds."""

from __future__ import annotations

import asyncio

import pytest

from server.cluster.client import ClusterEngine
from server.cluster.protocol import RemoteEngineError, ReplicaError, ReplicaLostError
from server.engine.errors import QueueFullError
from server.engine.types import GenerationRequest, SamplingParams, StreamEvent

pytestmark = pytest.mark.cluster


def ActorDiedError():  # noqa: N802  (imported here: the default run collects this file without the extra)
    from ray.exceptions import ActorDiedError as error

    return error()


def BackPressureError(**kwargs):  # noqa: N802
    from ray.serve.exceptions import BackPressureError as error

    return error(**kwargs)


def _event(text: str, finish: str | None = None) -> StreamEvent:
    return StreamEvent("r1", text, finish, 3, 1, None)


class _Responses:
    def __init__(self, items):
        self._items = list(items)
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self._items:
            raise StopAsyncIteration
        item = self._items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class _Handle:
    """Each call answers the next script; records routing keys."""

    def __init__(self, scripts):
        self.scripts = list(scripts)
        self.calls: list[dict] = []
        self.generate = self

    def options(self, **kwargs):
        self.calls.append(kwargs)
        return self

    def remote(self, request, key):
        return _Responses(self.scripts.pop(0))


def _run(engine: ClusterEngine) -> list[StreamEvent]:
    async def collect():
        request = GenerationRequest("r1", [{"role": "user", "content": []}], [], None, SamplingParams())
        return [e async for e in engine.generate(request)]

    return asyncio.run(collect())


def _engine(handle) -> ClusterEngine:
    return ClusterEngine(handle, store=None, spec=None, model_id="base", bundle_limits=None, max_retries=2)


def test_a_request_whose_replica_died_before_it_started_is_sent_again():
    handle = _Handle([[ActorDiedError()], [_event("a"), _event("b", "stop")]])
    engine = _engine(handle)
    assert [e.text for e in _run(engine)] == ["a", "b"]
    assert engine.counters.retried == 1 and len(handle.calls) == 2
    assert handle.calls[0] == {"stream": True, "multiplexed_model_id": ""}


def test_a_request_whose_replica_died_after_it_started_fails_with_replica_lost():
    engine = _engine(_Handle([[_event("a"), ActorDiedError()]]))
    with pytest.raises(ReplicaLostError, match="replica serving this request stopped"):
        _run(engine)
    assert engine.counters.lost_after_start == 1 and engine.counters.retried == 0


def test_retries_are_bounded():
    engine = _engine(_Handle([[ActorDiedError()]] * 3))
    with pytest.raises(ReplicaLostError):
        _run(engine)
    assert engine.counters.retried == 2


def test_replica_errors_keep_their_status_and_backpressure_is_429():
    engine = _engine(_Handle([[ReplicaError(429, "queue_full", "server busy", 1)]]))
    with pytest.raises(RemoteEngineError) as info:
        _run(engine)
    assert (info.value.status, info.value.error_type, str(info.value)) == (429, "queue_full", "server busy")
    assert info.value.retry_after_s == 1
    engine = _engine(_Handle([[BackPressureError(num_queued_requests=9, max_queued_requests=8)]]))
    with pytest.raises(QueueFullError, match="cluster queue is full"):
        _run(engine)
    assert engine.counters.backpressure == 1
