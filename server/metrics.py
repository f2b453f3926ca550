"""Prometheus metrics of one server instance. Each app gets its own registry, so tests can build many apps."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """All metric families, created once per app. Label `bundle` is "name@version" or "none"."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("m2pt_requests", "Finished requests", ["bundle", "status"], registry=r)
        self.finished = Counter(
            "m2pt_engine_finished",
            "Requests the engine finished, by finish reason",
            ["bundle", "reason"],
            registry=r,
        )
        self.queue_depth = Gauge("m2pt_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running_batch_size = Gauge(
            "m2pt_running_batch_size", "Rows in the running decode batch", registry=r
        )
        self.time_to_first_token = Histogram(
            "m2pt_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inter_token_latency = Histogram(
            "m2pt_inter_token_latency_seconds",
            "Time between tokens of a request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter("m2pt_generated_tokens", "Tokens generated", ["bundle"], registry=r)
        self.prompt_tokens = Counter("m2pt_prompt_tokens", "Prompt tokens prefilled", ["bundle"], registry=r)
        self.step_seconds = Histogram(
            "m2pt_engine_step_seconds",
            "Engine loop time by phase (prefill of new rows, one decode step)",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_tokens = Histogram(
            "m2pt_engine_step_tokens",
            "Tokens scheduled per engine step (decode rows + prompt chunks + image encodes)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=r,
        )
        self.engine_faults = Counter(
            "m2pt_engine_faults",
            "Model faults: a request's step raised (scope=row) or a whole step failed (scope=step)",
            ["scope"],
            registry=r,
        )
        self.bundle_loads = Counter("m2pt_bundle_loads", "Bundles loaded onto the device", registry=r)
        self.bundle_evictions = Counter(
            "m2pt_bundle_evictions", "Bundles evicted from the device", registry=r
        )
        self.bundle_load_seconds = Histogram(
            "m2pt_bundle_load_seconds",
            "Read + validate + precompute time of a bundle",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.resident_bundles = Gauge("m2pt_resident_bundles", "Bundles resident on the device", registry=r)
        self.image_cache_hits = Counter(
            "m2pt_image_feature_cache_hits", "Image-feature cache hits", registry=r
        )
        self.image_cache_misses = Counter(
            "m2pt_image_feature_cache_misses", "Image-feature cache misses", registry=r
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
