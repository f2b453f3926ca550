"""Map the server's `Settings` onto the engine's own config and open the bundle store (kept apart from the engine
so the engine does not depend on the HTTP layer's settings model)."""

from __future__ import annotations

import logging

from server.engine.engine import EngineConfig

log = logging.getLogger(__name__)


def engine_config_from_settings(settings) -> EngineConfig:
    return EngineConfig(
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_bundles_per_batch=settings.max_bundles_per_batch,
        max_prefill_rows=min(8, settings.max_batch_size),
        max_resident_bundles=settings.max_resident_bundles,
        image_cache_size=settings.image_cache_size,
        request_timeout_s=settings.request_timeout_s,
    )


def bundle_limits_from_settings(settings):
    from prompts_store.limits import BundleLimits

    return BundleLimits(
        max_bytes=settings.max_bundle_bytes + settings.max_manifest_bytes,
        max_manifest_bytes=settings.max_manifest_bytes,
    )


def open_store_from_settings(settings):
    """The writable store at `settings.store` (created if missing) layered over the read-only stores
    (`settings.read_only_stores`, the demo bundles by default), and the limits every bundle load must meet."""
    from prompts_store.layered import open_layered_store

    settings.check_paths()
    store = open_layered_store(settings.store.expanduser(), settings.read_only_stores)
    return store, bundle_limits_from_settings(settings)


def served_model_id(settings) -> str:
    """The id of the base model in /v1/models: "m2pt-demo-base" for the shipped demo, else the directory name or
    hub id as given."""
    from pathlib import Path

    from server.settings import DEMO_MODEL_DIR

    path = Path(settings.model).expanduser()
    if path.exists() and path.resolve() == DEMO_MODEL_DIR.resolve():
        return "m2pt-demo-base"
    return path.name if path.exists() else str(settings.model)
