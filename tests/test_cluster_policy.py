"""The cluster's pure parts (no Ray, default run): the affinity policy, the metrics relabelling, the flags."""

from __future__ import annotations

import argparse
from collections import Counter

import pytest

from server.cluster.affinity import AffinityPolicy, rendezvous_order
from server.cluster.metrics import ClusterCollector

REPLICAS = ["r-a", "r-b", "r-c"]


def test_rendezvous_order_is_stable_and_spreads_keys():
    keys = [f"sha256:{i:04x}" for i in range(300)]
    homes = Counter(rendezvous_order(k, REPLICAS)[0] for k in keys)
    assert set(homes) == set(REPLICAS) and min(homes.values()) > 60  # roughly a third each
    # removing a replica moves only the keys that lived on it
    for k in keys:
        full, reduced = rendezvous_order(k, REPLICAS), rendezvous_order(k, ["r-a", "r-c"])
        assert reduced == [r for r in full if r != "r-b"]


def test_a_bundle_stays_on_its_holder_while_under_the_bound():
    policy = AffinityPolicy(load_factor=1.25, max_holders=2)
    key = "sha256:hot"
    home = rendezvous_order(key, REPLICAS)[0]
    loads = dict.fromkeys(REPLICAS, 2)
    assert policy.rank(key, REPLICAS, loads, holders=set())[0] == home
    other = next(r for r in REPLICAS if r != home)
    # a holder that is not the home wins over the home while under the bound
    assert policy.rank(key, REPLICAS, loads, holders={other})[0] == other


def test_an_overloaded_holder_spreads_the_bundle_to_one_more_replica_by_rendezvous_order():
    policy = AffinityPolicy(load_factor=1.25, max_holders=2)
    key = "sha256:hot"
    order = rendezvous_order(key, REPLICAS)
    loads = {order[0]: 10, order[1]: 1, order[2]: 1}  # threshold ceil(1.25 * 13 / 3) = 6
    ranked = policy.rank(key, REPLICAS, loads, holders={order[0]})
    assert ranked[0] == order[1] and sorted(ranked) == sorted(REPLICAS)
    # with max_holders reached, the least-loaded holder is used: no third copy
    loads = {order[0]: 10, order[1]: 9, order[2]: 0}
    assert policy.rank(key, REPLICAS, loads, holders={order[0], order[1]})[0] == order[1]


def test_requests_without_a_bundle_go_to_the_least_loaded_replica():
    ranked = AffinityPolicy().rank(None, REPLICAS, {"r-a": 3, "r-b": 0, "r-c": 1}, set())
    assert ranked == ["r-b", "r-c", "r-a"]
    assert AffinityPolicy().rank("k", [], {}, set()) == []


REPORT = """# HELP m2pt_bundle_loads_total Bundles loaded onto the device
# TYPE m2pt_bundle_loads_total counter
m2pt_bundle_loads_total 3.0
# HELP m2pt_queue_depth Requests waiting for a batch slot
# TYPE m2pt_queue_depth gauge
m2pt_queue_depth 1.0
"""


class _Counters:
    retried, lost_after_start, backpressure = 2, 1, 0


def test_collector_labels_replica_series_and_reports_residency():
    from prometheus_client import CollectorRegistry, generate_latest

    stats = {
        "r1": {"resident": {"sha256:aa": "alpha@v1"}, "metrics": REPORT},
        "r2": {"resident": {"sha256:aa": "alpha@v1", "sha256:bb": "beta@v2"}, "metrics": REPORT},
    }
    registry = CollectorRegistry()
    registry.register(ClusterCollector(lambda: stats, _Counters()))
    text = generate_latest(registry).decode()
    assert text.count("# TYPE m2pt_replica_bundle_loads_total counter") == 1  # one family across replicas
    assert 'm2pt_replica_bundle_loads_total{replica="r1"} 3.0' in text
    assert 'm2pt_replica_queue_depth{replica="r2"} 1.0' in text
    assert 'm2pt_cluster_bundle_resident{bundle="beta@v2",content_hash="sha256:bb",replica="r2"} 1.0' in text
    assert text.count("m2pt_cluster_bundle_resident{") == 3
    assert "m2pt_cluster_replicas 2.0" in text
    assert "m2pt_cluster_retried_requests_total 2.0" in text


def test_cluster_flags_parse_and_refuse_bad_values():
    from server.cluster.options import add_cluster_flags, cluster_options

    parser = argparse.ArgumentParser()
    add_cluster_flags(parser)
    options = cluster_options(parser.parse_args(["--replicas", "2", "--uds", "/tmp/x.sock"]))
    assert (options.replicas, options.uds, options.router, options.load_factor) == (
        2,
        "/tmp/x.sock",
        "affinity",
        1.25,
    )
    with pytest.raises(ValueError, match="load-factor"):
        cluster_options(parser.parse_args(["--replicas", "2", "--affinity-load-factor", "0.5"]))


def test_cluster_package_does_not_import_ray_for_its_pure_parts():
    import subprocess
    import sys

    code = (
        "import sys, server.cli, server.cluster.affinity, server.cluster.metrics, server.cluster.options, "
        "server.cluster.netns, server.cluster.board; assert 'ray' not in sys.modules, 'ray imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_new_bundles_split_evenly_however_the_hashes_fall():
    policy = AffinityPolicy(load_factor=1.25, max_holders=2)
    replicas, holders, held = ["r-a", "r-b"], {}, {"r-a": 0, "r-b": 0}
    for i in range(16):
        key = f"sha256:{i}"
        choice = policy.rank(key, replicas, {"r-a": 0, "r-b": 0}, set(), held)[0]
        holders[key] = choice
        held[choice] += 1
    assert held == {"r-a": 8, "r-b": 8}  # count_factor 1.0: an even split
    # and once placed, a bundle stays where it is
    assert all(policy.rank(k, replicas, {"r-a": 0, "r-b": 0}, {r}, held)[0] == r for k, r in holders.items())


def test_a_local_ray_is_refused_while_the_host_network_is_up(monkeypatch):
    from server.cluster import launch, netns
    from server.cluster.options import ClusterOptions

    monkeypatch.setattr(netns, "exposed_interfaces", lambda: ["eth0"])
    with pytest.raises(launch.RayExposedError, match="eth0 up: run in a loopback-only network namespace"):
        launch.check_isolated(ClusterOptions(replicas=2))
    launch.check_isolated(ClusterOptions(replicas=2, ray_expose=True))  # the operator accepted it
    monkeypatch.setattr(netns, "exposed_interfaces", lambda: [])
    launch.check_isolated(ClusterOptions(replicas=2))  # inside `unshare -n`: only lo


def test_exposed_interfaces_lists_the_hosts_nics_but_not_loopback():
    from server.cluster.netns import exposed_interfaces

    assert "lo" not in exposed_interfaces()
