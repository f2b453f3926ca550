"""The ONE place the cluster code touches the engine (`server.engine.engine.Engine`). Re-point this module
when the engine's surface changes; nothing else in `server.cluster` imports `server.engine.engine`.

What the replicas need from an engine: build it from `Settings` with a metrics registry, start/stop it, stream
a `GenerationRequest`, its served model id and `ModelSpec` (uploads are validated against it), and which
bundle content hashes are resident on the device (for affinity routing and the residency gauge).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from server.engine.types import GenerationRequest, StreamEvent


def _engine_from_settings():
    """`Settings, metrics -> Engine`: the single-process server's own factory."""
    from server.engine_settings import engine_from_settings

    return engine_from_settings


def open_store(settings):
    """(BundleStore at `settings.store`, the limits every bundle must meet): the same as the engine's."""
    from server.engine_settings import open_store_from_settings

    return open_store_from_settings(settings)


async def build_engine(settings, metrics):
    """Load the model and start the engine loop (the model load runs in a worker thread)."""
    import asyncio

    engine = await asyncio.to_thread(_engine_from_settings(), settings, metrics)
    await engine.start()
    return engine


async def stop_engine(engine) -> None:
    await engine.stop()


def stream(engine, request: GenerationRequest) -> AsyncIterator[StreamEvent]:
    """The engine's event stream for `request` (raises before the first event for bad input, full queue)."""
    return engine.generate(request)


def served_model_id(engine) -> str:
    return engine.base_model_id


def served_spec(engine):
    """The `ModelSpec` bundles are validated against (its model id is the served one, never a local path)."""
    return engine.spec


def is_resident(engine, content_hash: str) -> bool:
    residency = getattr(engine, "residency", None)
    return residency is not None and content_hash in resident_bundles(engine)


def resident_bundles(engine) -> dict[str, str]:
    """content hash -> "name@version" of every bundle prefix resident on this engine's device."""
    residency = getattr(engine, "residency", None)
    if residency is None:
        return {}
    with residency._lock:  # the engine exposes no public listing yet
        return {key: entry.label for key, entry in residency._entries.items()}


def load_count(engine) -> int:
    """Bundles loaded onto the device since start (the engine's own counter)."""
    metrics = engine.metrics
    return 0 if metrics is None else int(metrics.bundle_loads._value.get())
