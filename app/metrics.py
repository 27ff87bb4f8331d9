"""/metrics: request latency (prometheus-fastapi-instrumentator) plus what the worker reports.

The worker is another process, so its counters live in Redis (worker/store.py METRICS) and a
collector turns them into Prometheus families at scrape time, with the queue depths.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, SummaryMetricFamily
from prometheus_fastapi_instrumentator import Instrumentator

from app.deps import admin
from app.errors import ADMIN_ERRORS
from worker.celery_app import QUEUES
from worker.store import ADAPT_BUCKETS, Store

COUNTERS = {
    "weights_hit_memory": "predictions served from the worker's in-process LRU",
    "weights_hit_cache": "weights found in the cache Redis",
    "weights_hit_disk": "full-mode weights found on disk",
    "weights_miss": "weights evicted or missing (the task was adapted again)",
    "readaptations": "adaptations redone because weights were gone",
    "predictions": "inputs answered",
    "predict_batches": "worker calls that answered them (concurrent calls on one task share one)",
    "generations": "inputs answered by /v1 generation (sampled or streamed)",
}


class WorkerCollector:
    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        try:
            m = self.store.metrics()
            depth = {q: self.store.r.llen(q) for q in QUEUES}
        except Exception:  # Redis down: /metrics still answers, /readyz says what is wrong
            return
        for name, doc in COUNTERS.items():
            c = CounterMetricFamily(f"mamlserve_{name}", doc)
            c.add_metric([], m.get(name, 0.0))
            yield c
        g = GaugeMetricFamily("mamlserve_queue_depth", "messages waiting in each Celery queue", labels=["queue"])
        for q, n in depth.items():
            g.add_metric([q], n)
        yield g
        buckets = [(str(b), m.get(f"adapt_seconds_le_{b}", 0.0)) for b in ADAPT_BUCKETS]
        buckets.append(("+Inf", m.get("adapt_seconds_count", 0.0)))
        p = SummaryMetricFamily("mamlserve_predict_seconds", "worker time answering predictions: per /predict batch "
                                "and per /v1 generation")
        p.add_metric([], m.get("predict_batches", 0.0) + m.get("generations", 0.0), m.get("predict_seconds_sum", 0.0))
        yield p
        h = HistogramMetricFamily("mamlserve_adaptation_seconds", "time to adapt a task (in the worker)")
        h.add_metric([], buckets, m.get("adapt_seconds_sum", 0.0))
        yield h


def setup(app: FastAPI, store: Store, need_key: bool) -> None:
    """/metrics, open or (need_key) for the admin key only: queue depths and request rates are the
    operator's, not every caller's."""
    registry = CollectorRegistry()  # one per app: tests build several
    registry.register(WorkerCollector(store))
    guard = {"dependencies": [Depends(admin)], "responses": {401: ADMIN_ERRORS[401], 403: ADMIN_ERRORS[403]}} if need_key else {}
    Instrumentator(registry=registry, excluded_handlers=["/metrics"]).instrument(app).expose(
        app, tags=["health"], response_class=PlainTextResponse, summary="Prometheus metrics", **guard)
