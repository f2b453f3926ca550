"""Cluster series on the ingress's `/metrics`, built from the replicas' routing-stats reports (no Ray here).

`ClusterCollector(stats, counters)` is a Prometheus collector registered on the ingress app's registry:
- every replica's own metrics, renamed `m2pt_*` -> `m2pt_replica_*` (so they never clash with the ingress's
  families) and labelled `replica="<id>"`, as of that replica's last report (every
  `--cluster-stats-period` seconds);
- `m2pt_cluster_bundle_resident{replica, bundle, content_hash}` = 1 for each bundle prefix resident on a
  replica (the residency gauge), `m2pt_cluster_replicas` (replicas reporting);
- the ingress's retry counters: `m2pt_cluster_retried_requests` (sent again after a replica died before they
  started), `m2pt_cluster_lost_requests` (failed because their replica died after they started),
  `m2pt_cluster_backpressure_rejections` (429 because every replica and the cluster queue were full).
`stats()` returns {replica id: {"resident": {hash: label}, "metrics": text, ...}}.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)


def relabel(text: str, replica: str, into: dict[str, Metric]) -> None:
    """Add the families of one replica's exposition to `into`, renamed to `m2pt_replica_*` and labelled with
    `replica` (one family per name across replicas)."""
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("m2pt_"):
            continue
        name = "m2pt_replica_" + family.name.removeprefix("m2pt_")
        out = into.setdefault(name, Metric(name, family.documentation, family.type))
        for sample in family.samples:
            sample_name = "m2pt_replica_" + sample.name.removeprefix("m2pt_")
            out.add_sample(sample_name, {**sample.labels, "replica": replica}, sample.value)


class ClusterCollector:
    def __init__(self, stats: Callable[[], dict[str, dict[str, Any]]], counters) -> None:
        self._stats = stats
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        resident = GaugeMetricFamily(
            "m2pt_cluster_bundle_resident",
            "1 for each bundle prefix resident on a replica's device",
            labels=["replica", "bundle", "content_hash"],
        )
        for replica, report in sorted(stats.items()):
            for content_hash, label in sorted(report.get("resident", {}).items()):
                resident.add_metric([replica, label, content_hash], 1)
        yield resident
        yield GaugeMetricFamily("m2pt_cluster_replicas", "Replicas reporting stats", value=len(stats))
        c = self._counters
        for name, doc, value in (
            ("m2pt_cluster_retried_requests", "Requests sent again after their replica died", c.retried),
            ("m2pt_cluster_lost_requests", "Requests failed by a replica death", c.lost_after_start),
            ("m2pt_cluster_backpressure_rejections", "429s: replicas and queue full", c.backpressure),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        families: dict[str, Metric] = {}
        for replica, report in sorted(stats.items()):
            try:
                relabel(report.get("metrics", ""), replica, families)
            except ValueError:  # a torn report: skip it this scrape
                log.warning("unparseable metrics report from replica %s", replica)
        yield from families.values()
