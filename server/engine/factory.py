"""`build_engine`: the one place that builds the real collaborators (runner over a family's `ModelOps`,
scheduler, output processor, preprocessor, bundle residency) and wires them into an `Engine`."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from server.engine.bundles import BundleResidency
from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.model_ops import ModelOps, ops_for
from server.engine.outputs import OutputProcessor
from server.engine.preprocess import Preprocessor
from server.engine.runner import ImageFeatureCache, ModelRunner
from server.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


def build_engine(
    frozen: Any,
    store: Any,
    config: EngineConfig,
    *,
    metrics: Any = None,
    bundle_limits: Any = None,
    model_id: str | None = None,
    ops: ModelOps | None = None,
    preprocessor: Any = None,
) -> Engine:
    """An `Engine` over `frozen` (a `m2pt.loading.FrozenLlava`) and a bundle `store` (`prompts_store` store or
    None). `ops` defaults to the model family's adapter (`ops_for`); a caller may pass its own (and its own
    preprocessor if its inputs differ). Not started: `await engine.start()`."""
    served_id = model_id or frozen.spec.model_id
    # Bundle errors quote `spec.model_id` to clients: use the served id, never a local path.
    spec = dataclasses.replace(frozen.spec, model_id=served_id)
    ops = ops if ops is not None else ops_for(frozen)
    if preprocessor is None:
        preprocessor = Preprocessor(frozen, _measured_encode_cost(frozen))
    outputs = OutputProcessor(frozen.processor.tokenizer, metrics)
    scheduler = Scheduler(config, outputs.push)
    runner = ModelRunner(ops, ImageFeatureCache(config.image_cache_size, metrics))

    def compute_prefix(prompts):
        import torch

        with torch.inference_mode():
            return ops.compute_prefix(prompts)

    def load_prefix(ref):
        """Blocking (a worker thread): read + validate the bundle from the store, then precompute its prefix on
        the engine loop thread between two steps (`Engine.call_in_loop`); the residency's loader."""
        loaded = store.load(ref, spec, bundle_limits)
        return engine.call_in_loop(lambda: compute_prefix(loaded.prompts)).result()

    residency = BundleResidency(load_prefix, config.max_resident_bundles, metrics)
    engine = Engine(
        config=config,
        scheduler=scheduler,
        runner=runner,
        preprocessor=preprocessor,
        outputs=outputs,
        residency=residency,
        store=store,
        model_id=served_id,
        spec=spec,
        bundle_limits=bundle_limits,
        metrics=metrics,
    )
    return engine


def _measured_encode_cost(frozen: Any) -> float | None:
    """`m2pt.calibrate.encode_cost_per_placeholder`, or None (count placeholders) when it cannot be measured."""
    if getattr(frozen, "family", None) is None:
        return None
    from m2pt.calibrate import encode_cost_per_placeholder

    try:
        return encode_cost_per_placeholder(frozen)
    except Exception:  # the smoke prefill passed at load time; a failure here only loses the calibration
        log.warning("could not measure the image-encode cost; counting image placeholders", exc_info=True)
        return None
