"""The Celery app: Redis broker and result backend, three queues, crash-safe delivery.

Queues: `predict` and `adapt` (what users wait on) and `meta` (hours-long meta-training).
The worker reads them in that priority order. One worker can take all three
(`-Q predict,adapt,meta`; a training run then holds its only process until it ends), or two
workers split them (`-Q predict,adapt` and `-Q meta`) so training never delays predictions.

Run a worker as `celery -A worker.celery_app worker -P prefork -c 1 -Q predict,adapt,meta`:
prefork so time limits apply and a crashed child is noticed; the model loads in the child.
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue

from model.settings import Settings, get_settings

QUEUES = ("predict", "adapt", "meta")


def visibility_timeout(s: Settings) -> int:
    # The broker redelivers an unacked task after this: it must outlast the longest run.
    return s.visibility_timeout_s or max(s.adapt_time_limit_s, s.meta_train_time_limit_s) + 600


def make_celery(s: Settings | None = None) -> Celery:
    s = s or get_settings()
    vt = visibility_timeout(s)
    app = Celery("mamlserve", broker=s.redis_url, backend=s.redis_url, include=["worker.tasks"])
    app.conf.update(
        # Each queue its own exchange and key: with one shared default key, a direct exchange
        # would copy every message into all three queues.
        task_queues=[Queue(q, Exchange(q), routing_key=q) for q in QUEUES],
        task_default_queue="adapt",
        task_routes={
            "worker.tasks.predict": {"queue": "predict"},
            "worker.tasks.adapter": {"queue": "predict"},
            "worker.tasks.generate": {"queue": "predict"},
            "worker.tasks.import_adapter": {"queue": "predict"},
            "worker.tasks.adapt": {"queue": "adapt"},
            "worker.tasks.meta_train": {"queue": "meta"},
        },
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # A task is acknowledged only once it has finished; a killed worker's task is redelivered.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": vt,
            "queue_order_strategy": "priority",  # predict before adapt before meta
            "unacked_restore_interval": max(1, min(10, vt // 4)),
            "unacked_restore_throttle": 1,  # scan for lost messages on every interval
        },
        result_backend_transport_options={"visibility_timeout": vt},
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    return app


app = make_celery()
