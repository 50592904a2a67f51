"""The daemon's Prometheus metrics (served on the admin listener's /metrics, never publicly).

One registry per daemon (not the process-global one): tests run several daemons' parts in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import Enum as EnumMetric

from watchdog_llm.policy import Phase

# Routes are labels: anything else under /v1 is one label, so clients cannot grow the series set.
KNOWN_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/responses"})
_MS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def route_label(path: str) -> str:
    return path if path in KNOWN_ROUTES else "/v1/other"


class Metrics:
    def __init__(self, served_seconds: Callable[[], float] | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "watchdog_llm_"
        self.state = EnumMetric(p + "state", "Phase of the daemon", states=[x.value for x in Phase], registry=r)
        self.yields = Counter(
            p + "yields", "Times the model was stopped for a job or a foreign GPU process", registry=r
        )
        self.detection = Histogram(
            p + "detection_seconds", "Job cgroup created -> job seen by the daemon", buckets=_MS_BUCKETS, registry=r
        )
        self.yield_time = Histogram(
            p + "yield_seconds", "Job seen -> the whole model tree gone", buckets=_MS_BUCKETS, registry=r
        )
        self.restarts = Counter(p + "restarts", "Model restarts after a crash", registry=r)
        self.starts = Counter(p + "model_starts", "Model starts", registry=r)
        self.requests = Counter(
            p + "requests",
            "Public requests answered, by route, status code and consumer (the key's name; empty: no valid key)",
            ["route", "code", "consumer"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            p + "upstream_latency_seconds",
            "Request sent to the model -> its response headers, by route and consumer",
            ["route", "consumer"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(p + "requests_in_flight", "Public requests being answered", registry=r)
        self.rejected = Counter(
            p + "requests_rejected", "Requests refused by the gateway, by reason", ["reason"], registry=r
        )
        self.webhooks = Counter(
            p + "webhook_deliveries",
            "Webhook deliveries by outcome (delivered, failed, dropped)",
            ["outcome"],
            registry=r,
        )
        self.swaps = Counter(p + "swaps", "Model swaps finished, by outcome (ready, failed)", ["outcome"], registry=r)
        # ON_DEMAND: requests that named a catalog model not loaded, by model (bounded: the catalog's names).
        self.demand_waiting = Gauge(
            p + "on_demand_waiting", "Requests waiting for the model they named to load", ["model"], registry=r
        )
        self.demand_wait = Histogram(
            p + "on_demand_wait_seconds",
            "How long a request waited for the model it named, by model and outcome (served, or the refusal's code)",
            ["model", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.demand_swaps = Counter(
            p + "on_demand_swaps", "Swaps started by a request, by model", ["model"], registry=r
        )
        served = Gauge(p + "served_seconds", "Seconds the model has served, over all runs", registry=r)
        if served_seconds is not None:
            served.set_function(served_seconds)
        self.state.state(Phase.INIT.value)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def by_consumer(self) -> dict[str, dict[str, Any]]:
        """The dashboard's table (GET /api/requests): per consumer, requests by status class and the
        model's latency (mean, and the histogram bucket that holds the 95th percentile)."""
        out: dict[str, dict[str, Any]] = {}

        def row(consumer: str) -> dict[str, Any]:
            return out.setdefault(consumer, {"requests": 0, "by_class": {}, "latency_count": 0, "latency_sum_s": 0.0})

        for metric in self.requests.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    r = row(sample.labels["consumer"])
                    r["requests"] += int(sample.value)
                    cls = sample.labels["code"][:1] + "xx"
                    r["by_class"][cls] = r["by_class"].get(cls, 0) + int(sample.value)
        buckets: dict[str, dict[float, float]] = {}
        for metric in self.upstream_latency.collect():
            for sample in metric.samples:
                consumer = sample.labels["consumer"]
                if sample.name.endswith("_count"):
                    row(consumer)["latency_count"] += int(sample.value)
                elif sample.name.endswith("_sum"):
                    row(consumer)["latency_sum_s"] += sample.value
                elif sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    per = buckets.setdefault(consumer, {})
                    per[le] = per.get(le, 0.0) + sample.value  # summed over routes
        for consumer, r in out.items():
            n = r["latency_count"]
            r["latency_mean_ms"] = round(1000 * r["latency_sum_s"] / n, 1) if n else None
            per = buckets.get(consumer, {})
            p95 = next((le for le, c in sorted(per.items()) if n and c >= 0.95 * n), None)
            r["latency_p95_le_ms"] = None if p95 is None or p95 == float("inf") else 1000 * p95
        return out
