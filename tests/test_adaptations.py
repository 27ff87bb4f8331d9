"""app/adaptations.py against a real Redis and a real broker (a database no worker consumes):
run ids fence the records, the reaper queues again only runs (and meta-training jobs) whose own
worker is gone, and enqueues what its creator could not."""

from __future__ import annotations

import json

import pytest
import redis

from app.adaptations import enqueue, job_sender, new_run, reap, reap_jobs, retry_failed, sender
from contract.queues import make_celery
from contract.store import Store, now
from conftest import RECORDS_PORT, settings

DB = 9
DEAD_AFTER_S = 3.0
FP = "fp0"  # the configuration the sender's fallback names


@pytest.fixture
def env(redis_servers):
    url = f"redis://127.0.0.1:{RECORDS_PORT}/{DB}"
    db = redis.Redis.from_url(url)
    db.flushdb()
    store = Store.from_url(url)
    yield store, sender(make_celery(settings(redis_url=url)), FP), db
    db.flushdb()


def sent(db, queue: str = f"adapt.{FP}") -> list[list]:
    """The messages on a queue of the broker, oldest first: [task id, run] (adapt), [job id] (meta)."""
    return [json.loads(json.loads(m)["headers"]["argsrepr"].replace("'", '"')) for m in reversed(db.lrange(queue, 0, -1))]


def task(store: Store, task_id: str, **fields) -> str:
    run = new_run()
    store.create_task(task_id, "t", {"status": "queued", "run": run, "enqueued": False, "queued_at": now(),
                                     "attempts": 0, "completions": 0, **fields})
    return run


def adapting(store: Store, task_id: str, worker: str) -> str:
    run = task(store, task_id)
    assert store.claim_task(task_id, run, worker, None)
    return run


def test_a_superseded_run_writes_nothing(env):
    store, send, db = env
    run = adapting(store, "t1", "host:1")
    assert store.update_task("t1", run=run, step=3)
    other = new_run()
    assert store.requeue_task("t1", {"status": "adapting", "run": run}, other)
    assert not store.requeue_task("t1", {"status": "adapting", "run": run}, new_run())  # one reaper wins
    assert not store.update_task("t1", run=run, step=9)
    assert not store.finish_task("t1", run)
    assert not store.claim_task("t1", run, "host:1", "host:1")
    rec = store.task("t1")
    assert rec["status"] == "queued" and rec["run"] == other and rec["step"] == 0 and rec["completions"] == 0
    assert store.claim_task("t1", other, "host:2", None) and store.finish_task("t1", other)
    assert store.task("t1")["completions"] == 1 and "t1" not in store.pending_tasks()


def test_a_second_claim_of_one_run_loses(env):
    store, _, _ = env
    run = task(store, "t1")
    assert store.claim_task("t1", run, "host:1", None)
    assert not store.claim_task("t1", run, "host:2", None)  # read the record before host:1 claimed it
    assert store.task("t1")["worker"] == "host:1" and store.task("t1")["attempts"] == 1


def test_reaper_queues_again_a_run_whose_worker_is_silent(env):
    store, send, db = env
    run = adapting(store, "t1", "host:1")
    store.r.hset("ms:workers", "host:1", json.dumps({"run": run, "at": now() - DEAD_AFTER_S - 1}))  # beat stopped
    assert reap(store, send, dead_after_s=DEAD_AFTER_S, enqueue_grace_s=30) == ["t1"]
    rec = store.task("t1")
    assert rec["status"] == "queued" and rec["run"] != run and rec["enqueued"] and rec["worker"] is None
    assert sent(db) == [["t1", rec["run"]]]
    assert reap(store, send, dead_after_s=DEAD_AFTER_S, enqueue_grace_s=30) == []  # queued and enqueued: left alone


def test_reaper_leaves_a_live_run_alone_whatever_other_workers_do(env):
    store, send, db = env
    mine = adapting(store, "t1", "host:1")
    theirs = adapting(store, "t2", "host:2")
    store.beat("host:1", {"run": mine})
    store.r.hset("ms:workers", "host:2", json.dumps({"run": theirs, "at": now() - 60}))  # host:2 died
    assert reap(store, send, dead_after_s=DEAD_AFTER_S, enqueue_grace_s=30) == ["t2"]
    assert store.task("t1")["run"] == mine and store.task("t1")["status"] == "adapting"


def test_reaper_queues_again_a_run_its_live_worker_dropped(env):
    """The worker lives on but is on another run, or none (it gave this one up when a Redis went away)."""
    store, send, db = env
    run = adapting(store, "t1", "host:1")
    store.beat("host:1", {})
    assert reap(store, send, dead_after_s=DEAD_AFTER_S, enqueue_grace_s=30) == ["t1"]
    assert store.task("t1")["run"] != run


def test_reaper_enqueues_what_its_creator_could_not_after_the_grace(env):
    store, send, db = env
    run = task(store, "t1")  # created, never enqueued
    assert reap(store, send, dead_after_s=DEAD_AFTER_S, enqueue_grace_s=30) == []  # its creator may still send it
    assert reap(store, send, dead_after_s=DEAD_AFTER_S, enqueue_grace_s=0) == ["t1"]
    assert sent(db) == [["t1", run]] and store.task("t1")["enqueued"]


def test_reaper_forgets_deleted_tasks(env):
    store, send, db = env
    task(store, "t1")
    store.r.delete("ms:task:t1")  # as if deleted by an older API
    assert reap(store, send, dead_after_s=DEAD_AFTER_S, enqueue_grace_s=0) == []
    assert store.pending_tasks() == [] and sent(db) == []


def test_a_failed_task_runs_again_under_a_new_run(env):
    store, send, db = env
    run = adapting(store, "t1", "host:1")
    assert store.update_task("t1", run=run, status="failed", error="boom")
    assert store.pending_tasks() == []
    assert retry_failed(store, send, store.task("t1"))
    rec = store.task("t1")
    assert rec["status"] == "queued" and rec["error"] is None and rec["run"] != run and rec["enqueued"]
    assert sent(db) == [["t1", rec["run"]]] and store.pending_tasks() == ["t1"]
    assert not retry_failed(store, send, {**rec, "status": "failed"})  # no longer failed: nothing happens


def test_enqueue_marks_only_its_own_run(env):
    store, send, db = env
    run = task(store, "t1")
    store.requeue_task("t1", {"run": run}, new_run())
    enqueue(store, send, "t1", run, None)  # a late sender of the old run
    assert not store.task("t1")["enqueued"]


def test_a_run_goes_to_the_adapt_queue_of_its_configuration(env):
    store, send, db = env
    run = task(store, "t1", fingerprint="fp1")
    enqueue(store, send, "t1", run, "fp1")
    assert sent(db, "adapt.fp1") == [["t1", run]] and sent(db) == []


def test_reaper_sends_again_once_a_job_whose_worker_is_silent_and_leaves_a_live_ones_alone(env):
    store, _, db = env
    send_job = job_sender(make_celery(settings(redis_url=f"redis://127.0.0.1:{RECORDS_PORT}/{DB}")), FP)
    for job, worker in (("dead-job", "host:1"), ("live-job", "host:2")):
        store.create_job(job, {"state": "running", "worker": worker, "fingerprint": "fp1", "progress": {}})
    store.r.hset("ms:workers", "host:1", json.dumps({"run": "job:dead-job", "at": now() - DEAD_AFTER_S - 1}))
    store.beat("host:2", {"run": "job:live-job"})
    assert reap_jobs(store, send_job, dead_after_s=DEAD_AFTER_S) == ["dead-job"]
    assert sent(db, "meta.fp1") == [["dead-job"]] and store.job("dead-job")["worker"] is None
    assert reap_jobs(store, send_job, dead_after_s=DEAD_AFTER_S) == []  # sent once: the next worker claims it
