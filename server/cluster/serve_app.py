"""The whole cluster as one Ray Serve application, with the ingress as a Serve deployment behind Ray's HTTP
proxy: what a KubeRay `RayService` (deploy/rayservice.yaml) or `serve run` deploys.

    serve run server.cluster.serve_app:app_builder replicas=2 store=/data/bundles model=/models/base

`app_builder(args)` is a Serve application builder; `args` are `Settings` fields (strings as `serve run` and
`serveConfigV2` give them) plus the cluster fields `replicas`, `replica_cpus`, `replica_gpus`,
`ingress_replicas`. The ingress deployment serves exactly the app `m2pt serve --replicas N` serves (same
`ClusterEngine`, router, errors, metrics); the difference is only who runs the HTTP server. Caveat: errors
that Ray's proxy produces itself (no ingress replica alive, the proxy's own backpressure) are Ray's plain
text, not our JSON; `m2pt serve --replicas N`, which runs the ingress in its own process, has none of those.
"""

from __future__ import annotations

import logging
from typing import Any

from server.cluster.options import ClusterOptions

log = logging.getLogger(__name__)
CLUSTER_ARGS = {"replicas", "replica_cpus", "replica_gpus", "ingress_replicas", "router"}


class ClusterIngress:
    """A Serve ingress deployment whose ASGI app is `build_ingress` over a handle to the engine replicas."""

    async def __init__(self, settings, options: ClusterOptions, replicas) -> None:
        self._settings, self._options, self._handle = settings, options, replicas
        self._info = await replicas.describe.remote()

    def __serve_build_asgi_app__(self):
        from server.cluster.launch import build_ingress

        app, _ = build_ingress(self._settings, self._options, self._handle, info=self._info)
        return app


def split_args(args: dict[str, Any]) -> tuple[Any, ClusterOptions, int]:
    """(Settings, ClusterOptions, ingress replicas) from a builder's string arguments."""
    from server.settings import Settings

    settings_args = {k: v for k, v in args.items() if k not in CLUSTER_ARGS}
    settings = Settings.model_validate(settings_args, strict=False)
    gpus = args.get("replica_gpus")
    options = ClusterOptions(
        replicas=int(args.get("replicas", 2)),
        replica_cpus=float(args.get("replica_cpus", 1)),
        replica_gpus=None if gpus is None else float(gpus),
        router=str(args.get("router", "affinity")),
    )
    return settings, options, int(args.get("ingress_replicas", 1))


def app_builder(args: dict[str, Any]):
    """The Serve application: `ClusterIngress` (route prefix "/") over `EngineReplica` × `replicas`."""
    from ray import serve

    from server.cluster.launch import engine_deployment

    settings, options, ingress_replicas = split_args(args)
    ingress = serve.deployment(
        serve.ingress()(ClusterIngress),
        name="Ingress",
        num_replicas=ingress_replicas,
        max_ongoing_requests=10_000,  # bounded by the engine replicas' queues and the handle queue
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(settings, options, engine_deployment(settings, options).bind(settings))
