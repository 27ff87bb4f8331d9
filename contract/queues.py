"""Queues and task names, and the Celery app both sides build: Redis broker, queues named by role
and configuration, crash-safe delivery.

Roles: `predict` (what users wait on), `adapt` and `meta` (hours-long meta-training). A worker
is started with the roles it takes (`-Q predict,adapt,meta`); at start it replaces them with its
real queues (worker/process.py `_queues`): `adapt.<fingerprint>` and `meta.<fingerprint>`, shared
by every worker of the same configuration (contract/config.py), and, for `predict`, its own direct
queue: the API sends each prediction to one live worker it picks, so that it knows whom to
watch and can send the call again elsewhere when that worker dies (app/routing.py). Any number
of workers may start with the same command: nothing a worker does at start touches the others.

A worker runs as `celery -A worker.celery_app worker ...` (that module adds the worker's tasks);
the API builds the same app to send messages, and names tasks by the strings below.
"""

from __future__ import annotations

from celery import Celery
from celery.utils.nodenames import worker_direct
from kombu import Exchange, Queue

from model.settings import Settings, get_settings

QUEUES = ("predict", "adapt", "meta")  # the roles a worker may take
MARGIN_S = 600

# The worker's tasks, by name: messages already queued carry these strings, so they never change.
ADAPT = "worker.tasks.adapt"  # (task id, run id)
META_TRAIN = "worker.tasks.meta_train"  # (job id)
PREDICT = "worker.tasks.predict"  # (task id, groups of queries {input, options?}, reply key): on a worker's direct queue
GENERATE = "worker.tasks.generate"  # (task id, text, sampling, reply key)
ADAPTER = "worker.tasks.adapter"  # (task id, export format, reply key)
IMPORT_ADAPTER = "worker.tasks.import_adapter"  # (task record, zip as base64, max bytes, reply key)


def queue(role: str, fingerprint: str) -> Queue:
    """The shared queue of a role for workers of one configuration; each its own exchange and key
    (one shared key on a direct exchange would copy every message into every queue)."""
    name = f"{role}.{fingerprint}"
    return Queue(name, Exchange(name), routing_key=name)


def direct(node: str) -> Queue:
    """A worker's own queue (Celery's worker_direct), for calls the API sends to that worker alone."""
    return worker_direct(node)


def visibility(s: Settings) -> dict[str, int]:
    """Per role, how long the broker waits before it redelivers a message its worker never
    acknowledged: it must outlast the role's longest run (acks_late), and no more, since it is
    also how long a message lost with a killed worker waits (contract/broker.py)."""
    if s.visibility_timeout_s:
        return {"adapt": s.visibility_timeout_s, "meta": s.visibility_timeout_s}
    return {"adapt": s.adapt_time_limit_s + MARGIN_S, "meta": s.meta_train_time_limit_s + MARGIN_S}


def make_celery(s: Settings | None = None, include: list[str] | None = None) -> Celery:
    """include: the modules that define tasks (the worker's); the API only sends."""
    s = s or get_settings()
    vt = visibility(s)
    base = min(vt.values())
    app = Celery("mamlserve", broker=s.redis_url, backend=s.redis_url, include=include or [])
    app.conf.update(
        broker_transport="contract.broker:Transport",
        task_queues=[],  # every message names its queue (worker/tasks.py, app/): nothing is routed by default
        task_default_queue="unrouted",
        worker_direct=True,
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
            "visibility_timeout": base,
            "visibility_by_role": {role: t - base for role, t in vt.items()},
            "queue_order_strategy": "priority",
            "unacked_restore_interval": max(1, min(10, base // 4)),
            "unacked_restore_throttle": 1,  # scan for lost messages on every interval
        },
        result_backend_transport_options={"visibility_timeout": base},
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    return app
