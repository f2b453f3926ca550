"""The edge between the server's `Settings` and the engine: settings → `EngineConfig`, the bundle store and its
limits, the served model id, and `engine_from_settings` (what the app's lifespan calls). Kept out of
`server/engine/`, which imports neither `server.settings` nor `server.api`."""

from __future__ import annotations

import logging
from pathlib import Path

from server.engine.config import EngineConfig
from server.settings import DEMO_MODEL_DIR, Settings

log = logging.getLogger(__name__)


def engine_config_from_settings(settings: Settings) -> EngineConfig:
    return EngineConfig(
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_num_batched_tokens=max(settings.max_num_batched_tokens, settings.max_batch_size),
        max_bundles_per_batch=settings.max_bundles_per_batch,
        max_resident_bundles=settings.max_resident_bundles,
        image_cache_size=settings.image_cache_size,
        request_timeout_s=settings.request_timeout_s,
    )


def open_store_from_settings(settings: Settings):
    """The writable store at `settings.store` (created if missing) layered over the read-only stores
    (`settings.read_only_stores`, the demo bundles by default), and the limits every bundle load must meet."""
    from prompts_store.layered import open_layered_store

    settings.check_paths()
    store = open_layered_store(settings.store.expanduser(), settings.read_only_stores)
    return store, settings.bundle_limits()


def served_model_id(settings: Settings) -> str:
    """The id of the base model in /v1/models: "m2pt-demo-base" for the shipped demo, else the directory name or
    hub id as given."""
    path = Path(settings.model).expanduser()
    if path.exists() and path.resolve() == DEMO_MODEL_DIR.resolve():
        return "m2pt-demo-base"
    return path.name if path.exists() else str(settings.model)


def engine_from_settings(settings: Settings, metrics=None):
    """Load the model named by `settings.model` and open `settings.store` (blocking; call from the lifespan)."""
    from m2pt.loading import load_frozen_llava
    from server.engine.factory import build_engine

    store, limits = open_store_from_settings(settings)  # checks paths before the (slow) model load
    frozen = load_frozen_llava(str(settings.model), device=settings.device, dtype=settings.dtype)
    return build_engine(
        frozen,
        store,
        engine_config_from_settings(settings),
        metrics=metrics,
        bundle_limits=limits,
        model_id=served_model_id(settings),
    )
