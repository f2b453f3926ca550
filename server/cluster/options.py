"""`m2pt serve --replicas N ...`: the cluster flags (pure argparse; Ray is imported only when they are used).

`add_cluster_flags(parser)` adds them to `m2pt serve`; `cluster_options(args)` reads them back as
`ClusterOptions`. With `--replicas 0` (the default) `m2pt serve` is the single-process server, unchanged.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class ClusterOptions:
    replicas: int = 0
    ray_address: str | None = None
    uds: str | None = None
    replica_cpus: float = 1.0
    replica_gpus: float | None = None
    load_factor: float = 1.25
    max_holders: int = 2
    min_spill_load: int | None = None
    stats_period_s: float = 1.0
    max_retries: int = 2
    router: str = "affinity"
    ray_expose: bool = False


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "cluster (Ray Serve; needs `pip install -e .[cluster]`, see docs/cluster.md)"
    )
    add = group.add_argument
    add(
        "--replicas",
        type=int,
        default=0,
        help="run N engine replicas on Ray Serve behind this endpoint (0: off)",
    )
    add(
        "--ray-address",
        default=None,
        help="join this Ray cluster ('auto' = the local one); default: start one",
    )
    add("--uds", default=None, metavar="PATH", help="listen on this Unix socket instead of --host/--port")
    add(
        "--ray-expose",
        action="store_true",
        help="start Ray although this host has network interfaces up (Ray's ports bind ALL of them; "
        "default: refuse unless only loopback is up, e.g. inside `unshare -n`)",
    )
    add("--replica-cpus", type=float, default=1.0, help="Ray CPUs reserved per replica (default: 1)")
    add("--replica-gpus", type=float, default=None, help="Ray GPUs per replica (default: 1 if CUDA, else 0)")
    add(
        "--affinity-load-factor",
        dest="load_factor",
        type=float,
        default=1.25,
        help="a bundle stays on its replica while that replica's load is under this × the average (1.25)",
    )
    add(
        "--affinity-max-holders",
        dest="max_holders",
        type=int,
        default=2,
        help="replicas a hot bundle may spread to (default: 2)",
    )
    add(
        "--affinity-min-spill",
        dest="min_spill_load",
        type=int,
        default=None,
        help="never move a bundle off a replica with fewer requests in flight (default: --max-batch-size)",
    )
    add(
        "--cluster-stats-period",
        dest="stats_period_s",
        type=float,
        default=1.0,
        help="seconds between replica residency/metrics reports (default: 1)",
    )
    add(
        "--cluster-router",
        dest="router",
        choices=["affinity", "pow2"],
        default="affinity",
        help="affinity (default): bundle-affinity router; pow2: Ray's default router (no affinity)",
    )
    add(
        "--cluster-retries",
        dest="max_retries",
        type=int,
        default=2,
        help="times a request is sent again when its replica dies before it started (default: 2)",
    )


def cluster_options(args: argparse.Namespace) -> ClusterOptions:
    """The flags as `ClusterOptions`; raises ValueError for values out of range."""
    options = ClusterOptions(
        replicas=args.replicas,
        ray_address=args.ray_address,
        uds=args.uds,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
        load_factor=args.load_factor,
        max_holders=args.max_holders,
        min_spill_load=args.min_spill_load,
        stats_period_s=args.stats_period_s,
        max_retries=args.max_retries,
        router=args.router,
        ray_expose=args.ray_expose,
    )
    if options.replicas < 0 or options.max_holders < 1 or options.max_retries < 0:
        raise ValueError("--replicas, --cluster-retries must be ≥ 0 and --affinity-max-holders ≥ 1")
    if options.load_factor < 1 or options.stats_period_s <= 0 or options.replica_cpus < 0:
        raise ValueError("--affinity-load-factor must be ≥ 1, --cluster-stats-period > 0, --replica-cpus ≥ 0")
    return options
