"""Queueing adaptations: enqueue a task's run, queue a failed task again, and the reaper that
queues again a run (or a meta-training job) whose worker is gone.

Every adaptation run has an id, kept in the task record and carried by its Celery message; the
worker drops a message whose run is no longer the record's, and a superseded run writes nothing
(contract/store.py `set_task_if`). So a run can be replaced at any time without two runs finishing
one task. A run is queued again only when its own worker process stopped beating: never because
another worker started (workers do nothing to the broker at start), so any number of workers may
join. Plain functions over the record store and `send(task_id, run, fingerprint)`, which puts the
message on its configuration's adapt queue: no FastAPI here.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from celery import Celery

from contract.queues import ADAPT, META_TRAIN, queue
from contract.store import Store, now

log = logging.getLogger(__name__)
Send = Callable[[str, str, str | None], None]
SendJob = Callable[[str, str | None], None]


def new_run() -> str:
    return uuid.uuid4().hex


def sender(celery: Celery, fallback: str) -> Send:
    """send(task_id, run, fingerprint): the run's message on the adapt queue of its configuration
    (fallback: a record from before fingerprints)."""
    def send(task_id: str, run: str, fingerprint: str | None) -> None:
        celery.send_task(ADAPT, args=[task_id, run], queue=queue("adapt", fingerprint or fallback), ignore_result=True)

    return send


def job_sender(celery: Celery, fallback: str) -> SendJob:
    def send(job_id: str, fingerprint: str | None) -> None:
        celery.send_task(META_TRAIN, args=[job_id], queue=queue("meta", fingerprint or fallback), ignore_result=True)

    return send


def enqueue(store: Store, send: Send, task_id: str, run: str, fingerprint: str | None) -> None:
    """Send the run's message, then mark the record enqueued (while the run is still its own).
    A crash between the two leaves it not enqueued: the reaper sends it after the grace period."""
    send(task_id, run, fingerprint)
    store.update_task(task_id, run=run, enqueued=True)


def retry_failed(store: Store, send: Send, rec: dict[str, Any]) -> bool:
    """A failed task, posted again, runs again under a new run id; False when it is no longer failed."""
    run = new_run()
    if not store.requeue_task(rec["id"], {"status": "failed", "run": rec.get("run")}, run):
        return False
    enqueue(store, send, rec["id"], run, rec.get("fingerprint"))
    return True


def reap_jobs(store: Store, send_job: SendJob, *, dead_after_s: float) -> list[str]:
    """Meta-training jobs whose worker process stopped beating on them are sent again: a worker
    takes the job over and continues from its last checkpoint (worker/tasks.py `meta_train`)."""
    queued = []
    for job in store.list_jobs(0, 1000, {"running"})[0]:
        worker = job.get("worker")
        if worker and not store.runs(worker, f"job:{job['id']}", dead_after_s):
            store.update_job(job["id"], worker=None)  # once: the next pass finds it unclaimed
            send_job(job["id"], job.get("fingerprint"))
            queued.append(job["id"])
    return queued


def reap(store: Store, send: Send, *, dead_after_s: float, enqueue_grace_s: float) -> list[str]:
    """One pass over the queued and adapting tasks; returns the ids it queued.

    An adapting task whose worker process is not beating on its run (the process died, or it
    dropped the run when a Redis went away) gets a new run. A queued task its creator never
    enqueued (the broker was down, or the API died in between) is enqueued. Only the task's own
    worker's heartbeat counts, so with several workers a busy one is never mistaken for a dead
    one; every change is a compare-and-set on the run id, so several reapers may run at once.
    """
    queued = []
    for task_id in store.pending_tasks():
        rec = store.task(task_id)
        if rec is None:
            store.forget_pending(task_id)
            continue
        run = rec.get("run")
        if rec["status"] == "adapting":
            # The record is read before the heartbeat, and a worker beats its run before it claims
            # it and stops only after it has finished: a live run is never taken for a dead one.
            if store.runs(rec.get("worker"), run, dead_after_s):
                continue
            fresh = new_run()
            if store.requeue_task(task_id, {"status": "adapting", "run": run}, fresh):
                enqueue(store, send, task_id, fresh, rec.get("fingerprint"))
                queued.append(task_id)
        elif rec["status"] == "queued" and not rec.get("enqueued"):
            if now() - rec.get("queued_at", rec["created_at"]) > enqueue_grace_s:
                enqueue(store, send, task_id, run, rec.get("fingerprint"))
                queued.append(task_id)
    return queued


async def reap_forever(store: Store, send: Send, send_job: SendJob, *, every_s: float, dead_after_s: float,
                       enqueue_grace_s: float) -> None:
    """The API's reaper: a pass every every_s seconds, off the event loop; a Redis away only skips passes."""
    def one_pass() -> list[str]:
        return reap(store, send, dead_after_s=dead_after_s, enqueue_grace_s=enqueue_grace_s) + \
            reap_jobs(store, send_job, dead_after_s=dead_after_s)

    while True:
        await asyncio.sleep(every_s)
        try:
            queued = await anyio.to_thread.run_sync(one_pass)
        except Exception as e:  # Redis or the broker restarting: the next pass tries again
            log.warning("reaper pass failed: %s: %s", type(e).__name__, e)
            continue
        if queued:
            log.warning("reaper: queued again %s (their worker is gone)", ", ".join(queued))
