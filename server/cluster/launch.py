"""Start (or join) Ray, deploy `EngineReplica` × N with the affinity router, and serve our FastAPI app in this
process (the ingress) over a `ClusterEngine`.

The ingress is the same app as the single-process server (`server.app.create_app`: routes, auth, body
limits, error shapes, metrics), built with the cluster client as its engine, so every answer and every
error is ours — Ray's HTTP proxy is not started (`http_options.location = NoServer`). More ingress
processes can join the same Ray cluster with `--ray-address` and share the deployment.

SAFETY: Ray's GCS, raylet and worker gRPC ports bind every interface. Run this inside a loopback-only network
namespace on a shared host (`scripts/serve_cluster.sh` does), or behind a firewall (docs/cluster.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from server.cluster.options import ClusterOptions

log = logging.getLogger(__name__)

APP_NAME = "m2pt"
DEPLOYMENT_NAME = "EngineReplica"
ROUTER_CLASSES = {
    "affinity": "server.cluster.router.BundleAffinityRouter",
    "pow2": "server.cluster.router.PowerOfTwoWithReports",
}


def start_ray(options: ClusterOptions) -> None:
    import ray

    repo_root = str(Path(__file__).resolve().parents[2])
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if repo_root not in paths:  # replicas import `server` too; a started raylet passes this on
        os.environ["PYTHONPATH"] = os.pathsep.join([repo_root, *paths])
    if options.ray_address:
        ray.init(address=options.ray_address, include_dashboard=False, log_to_driver=True)
    else:
        check_isolated(options)
        cpus = max(2, int(options.replicas * options.replica_cpus + 1))
        ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)


class RayExposedError(RuntimeError):
    """Starting Ray here would open its ports on a network interface and `--ray-expose` was not given."""


def check_isolated(options: ClusterOptions) -> None:
    """Refuse to start a local Ray while non-loopback interfaces are up, unless `--ray-expose`."""
    from server.cluster.netns import exposed_interfaces

    exposed = exposed_interfaces()
    if exposed and not options.ray_expose:
        raise RayExposedError(
            f"Ray's ports bind every interface and this host has {', '.join(exposed)} up: run in a "
            "loopback-only network namespace (scripts/serve_cluster.sh, `unshare -n`), firewall Ray's ports "
            "and pass --ray-expose, or join a cluster with --ray-address (docs/cluster.md)"
        )


def deploy_replicas(settings, options: ClusterOptions):
    """Deploy the replicas (no HTTP proxy) and wait until they serve; returns the deployment's handle."""
    from ray import serve

    serve.start(http_options={"location": "NoServer"})
    deployment = engine_deployment(settings, options)
    return serve.run(deployment.bind(settings), name=APP_NAME, route_prefix=None)


def engine_deployment(settings, options: ClusterOptions):
    """The `EngineReplica` Serve deployment: replicas, queue bounds, router, health checks."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from server.cluster.replica import EngineReplica

    gpus = options.replica_gpus
    if gpus is None:
        gpus = 1.0 if settings.device == "cuda" or (settings.device == "auto" and _has_cuda()) else 0.0
    spill = options.min_spill_load if options.min_spill_load is not None else settings.max_batch_size
    router_config = RequestRouterConfig(
        request_router_class=ROUTER_CLASSES[options.router],
        request_router_kwargs={
            "load_factor": options.load_factor,
            "max_holders": options.max_holders,
            "min_spill_load": spill,
        }
        if options.router == "affinity"
        else {},
        request_routing_stats_period_s=options.stats_period_s,
        request_routing_stats_timeout_s=max(5.0, 5 * options.stats_period_s),
    )
    return serve.deployment(
        EngineReplica,
        name=DEPLOYMENT_NAME,
        num_replicas=options.replicas,
        max_ongoing_requests=settings.max_batch_size + settings.max_queue,
        max_queued_requests=settings.max_queue * max(1, options.replicas),
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": gpus},
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=settings.shutdown_timeout_s,
        request_router_config=router_config,
    )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_ingress(settings, options: ClusterOptions, handle, info: dict | None = None):
    """The FastAPI app over a `ClusterEngine` (with the cluster metrics on its `/metrics`). `info` is a
    replica's `describe()` (fetched here, blocking, when not given)."""
    from server.app import create_app
    from server.cluster import board
    from server.cluster.client import ClusterEngine
    from server.cluster.engine_adapter import open_store
    from server.cluster.metrics import ClusterCollector

    info = info if info is not None else handle.describe.remote().result()
    store, limits = open_store(settings)
    engine = ClusterEngine(
        handle,
        store,
        info["spec"],
        info["model_id"],
        limits,
        options.max_retries,
        send_routing_key=options.router == "affinity",
    )
    app = create_app(settings, engine=engine, store=store, spec=info["spec"])  # the ops routes' own store
    app.state.metrics.registry.register(ClusterCollector(board.latest, engine.counters))
    return app, engine


def run_cluster(settings, options: ClusterOptions, access_log: bool = True, log_level: str = "info") -> int:
    """Serve until stopped (SIGINT/SIGTERM), then shut the replicas and Ray down. Returns the exit status."""
    import ray
    import uvicorn
    from ray import serve

    start_ray(options)
    try:
        handle = deploy_replicas(settings, options)
        app, engine = build_ingress(settings, options, handle)
        where = options.uds or f"http://{settings.host}:{settings.port}"
        log.info("cluster of %d replicas serving %s on %s", options.replicas, engine.base_model_id, where)
        bind = {"uds": options.uds} if options.uds else {"host": settings.host, "port": settings.port}
        uvicorn.run(
            app,
            **bind,
            log_config=None,
            log_level=log_level.lower(),
            access_log=access_log,
            timeout_graceful_shutdown=settings.shutdown_timeout_s,
            server_header=False,
        )
        engine.stop()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
