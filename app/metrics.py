"""/metrics: request latency (prometheus-fastapi-instrumentator) plus what the workers report.

The workers are other processes, on other machines too, so their counters live in Redis, one hash
per worker (contract/store.py METRICS), and a collector turns them into Prometheus families at scrape
time, each sample labelled with its worker (the Celery node), with the depths of the queues.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, SummaryMetricFamily
from prometheus_fastapi_instrumentator import Instrumentator

from app.deps import admin
from app.errors import ADMIN_ERRORS
from contract.store import ADAPT_BUCKETS, Store

COUNTERS = {
    "weights_hit_memory": "predictions served from the worker's in-process LRU",
    "weights_hit_cache": "adapted weights read from the cache Redis",
    "weights_hit_store": "imported adapters read from the records Redis",
    "weights_miss": "weights evicted or missing (the task was adapted again)",
    "readaptations": "adaptations redone because weights were gone",
    "predictions": "inputs answered",
    "predict_batches": "worker calls that answered them (concurrent calls on one task share one)",
    "generations": "inputs answered by /v1 generation (sampled or streamed)",
}
ROLES = ("adapt", "meta")  # the shared queues (predictions go to each worker's own)


class WorkerCollector:
    def __init__(self, store: Store, fingerprint):
        self.store = store
        self.fingerprint = fingerprint  # () -> the API's configuration, known once the app has started

    def collect(self):
        fp = self.fingerprint()
        try:
            per_worker = self.store.metrics()
            depth = {q: self.store.r.llen(f"{q}.{fp}") for q in ROLES} if fp else {}
        except Exception:  # Redis down: /metrics still answers, /readyz says what is wrong
            return
        for name, doc in COUNTERS.items():
            c = CounterMetricFamily(f"mamlserve_{name}", doc, labels=["worker"])
            for w, m in per_worker.items():
                c.add_metric([w], m.get(name, 0.0))
            yield c
        g = GaugeMetricFamily("mamlserve_queue_depth", "messages waiting in each shared queue of the API's "
                              "configuration", labels=["queue"])
        for q, n in depth.items():
            g.add_metric([q], n)
        yield g
        p = SummaryMetricFamily("mamlserve_predict_seconds", "worker time answering predictions: per /predict batch "
                                "and per /v1 generation", labels=["worker"])
        h = HistogramMetricFamily("mamlserve_adaptation_seconds", "time to adapt a task (in the worker)", labels=["worker"])
        for w, m in per_worker.items():
            p.add_metric([w], m.get("predict_batches", 0.0) + m.get("generations", 0.0), m.get("predict_seconds_sum", 0.0))
            buckets = [(str(b), m.get(f"adapt_seconds_le_{b}", 0.0)) for b in ADAPT_BUCKETS]
            buckets.append(("+Inf", m.get("adapt_seconds_count", 0.0)))
            h.add_metric([w], buckets, m.get("adapt_seconds_sum", 0.0))
        yield p
        yield h


def setup(app: FastAPI, store: Store, need_key: bool) -> None:
    """/metrics, open or (need_key) for the admin key only: queue depths and request rates are the
    operator's, not every caller's."""
    registry = CollectorRegistry()  # one per app: tests build several
    registry.register(WorkerCollector(store, lambda: app.state.fingerprint))
    guard = {"dependencies": [Depends(admin)], "responses": {401: ADMIN_ERRORS[401], 403: ADMIN_ERRORS[403]}} if need_key else {}
    Instrumentator(registry=registry, excluded_handlers=["/metrics"]).instrument(app).expose(
        app, tags=["health"], response_class=PlainTextResponse, summary="Prometheus metrics", **guard)
