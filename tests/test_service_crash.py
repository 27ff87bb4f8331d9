"""Crashes in the middle of an adaptation: a worker SIGKILLed (the broker redelivers the task:
acks_late, visibility timeout), either Redis restarted (the reaper re-queues the task its worker
dropped). Each time the task ends ready exactly once."""

from __future__ import annotations

import time

import pytest

from conftest import ENV, auth, own_service, sentiment, wait_for, wait_status


def long_body(tag: str, steps: int = 60) -> dict:
    words = "the quick brown fox jumps over the lazy dog while the movie was great and i loved it " * 4
    demos = [{"input": f"{words} {tag} {i}", "output": "positive" if i % 2 else "negative"} for i in range(8)]
    return {"demonstrations": demos, "options": ["positive", "negative"], "adaptation": {"steps": steps}}


def long_task(client, tag: str, steps: int = 60) -> str:
    """A task whose adaptation takes long enough to be interrupted; its id once it is under way."""
    r = client.post("/tasks", json=long_body(tag, steps), headers=auth())
    assert r.status_code == 202, r.text
    tid = r.json()["id"]

    def mid_adaptation():
        rec = client.app.state.store.task(tid)
        assert rec["status"] != "ready", "adaptation finished before it could be interrupted"
        return rec["status"] == "adapting" and rec.get("step", 0) >= 2

    wait_for(mid_adaptation, 120, "adaptation under way", every=0.01)
    return tid


def ends_ready_once(client, tid: str) -> None:
    done = wait_status(client, tid, timeout=180)
    assert done["progress"]["step"] == 60
    assert client.app.state.store.task(tid)["completions"] == 1
    r = client.post("/predict", json={"task_id": tid, "inputs": ["a great movie"]}, headers=auth())
    assert r.status_code == 200, r.text


def test_worker_killed_during_adaptation_ends_ready_once(client, worker, records):
    tid = long_task(client, "kill")
    key = f"ms:task:{tid}"
    worker.kill()
    rec = client.app.state.store.task(tid)
    assert rec["status"] == "adapting" and rec["attempts"] == 1 and rec["completions"] == 0
    assert int(records.hlen("unacked")) >= 1  # the broker still holds the unacknowledged delivery

    worker.start()
    done = wait_status(client, tid, timeout=180)
    assert done["progress"]["step"] == 60
    rec = client.app.state.store.task(tid)
    assert rec["attempts"] == 2 and rec["completions"] == 1  # ran again from the start, finished once
    wait_for(lambda: records.hlen("unacked") == 0, 30, "the redelivered message acknowledged")
    assert records.hget(key, "completions") == b"1"
    r = client.post("/predict", json={"task_id": tid, "inputs": ["a great movie"]}, headers=auth())
    assert r.status_code == 200, r.text


def test_a_task_deleted_while_adapting_and_posted_again_is_not_written_by_the_old_run(client, worker):
    """The old run keeps going until its next step; the new record is its own run's alone."""
    tid = long_task(client, "repost")
    assert client.delete(f"/tasks/{tid}", headers=auth()).status_code == 204
    reposted = time.time()
    r = client.post("/tasks", json=long_body("repost"), headers=auth())
    assert r.status_code == 202 and r.json()["id"] == tid, r.text
    ends_ready_once(client, tid)
    rec = client.app.state.store.task(tid)
    assert rec["attempts"] == 1 and rec["started_at"] >= reposted


@pytest.fixture(scope="module")
def deployed(redis_servers):
    """Two workers and an API as deployed: the broker redelivers a lost message only after the
    production visibility timeout (hours), so what recovers a run within a test is the reaper."""
    with own_service(db=3, workers=2, visibility_timeout_s="0", adapt_max_steps="600") as service:
        yield service


def test_reaper_queues_again_only_the_run_whose_own_worker_died(deployed):
    """Another worker dying leaves a running adaptation alone; its own worker dying gets it queued
    again (no broker redelivery for hours), and a worker started later finishes it, once."""
    client, store = deployed.client, deployed.client.app.state.store
    tid = long_task(client, "reaper", steps=600)
    runner = deployed.runner(tid)
    idle = next(w for w in deployed.workers if w is not runner)
    run = store.task(tid)["run"]

    idle.kill()
    time.sleep(float(ENV["MAMLSERVE_WORKER_DEAD_AFTER_S"]) + 2)  # its heartbeat is stale; reaper passes go by
    rec = store.task(tid)
    assert rec["status"] == "adapting" and rec["run"] == run and rec["attempts"] == 1, rec

    runner.kill()
    requeued = wait_for(lambda: (r := store.task(tid))["run"] != run and r, 30, "the run queued again")
    assert requeued["status"] == "queued" and requeued["attempts"] == 1, requeued
    idle.start()
    done = wait_status(client, tid, timeout=300)
    rec = store.task(tid)
    assert done["progress"]["step"] == 600 and rec["run"] == requeued["run"]
    assert rec["attempts"] == 2 and rec["completions"] == 1 and rec["worker"] in idle.processes()
    runner.start()


def test_records_redis_restart_during_adaptation_ends_ready_once(deployed, redis_servers):
    """The broker and the records gone (SIGKILL) for longer than the store's retries, then back
    from the AOF: the worker's delivery of the run is lost with its connection, and the run ends
    ready once all the same."""
    tid = long_task(deployed.client, "records-restart")
    redis_servers[0].restart(down_s=3, kill=True)
    ends_ready_once(deployed.client, tid)


def test_cache_redis_restart_during_adaptation_ends_ready_once(deployed, redis_servers):
    """The weights cache gone when the run wants to store its weights: it waits for it."""
    tid = long_task(deployed.client, "cache-restart")
    redis_servers[1].restart(down_s=3, kill=True)
    ends_ready_once(deployed.client, tid)


@pytest.mark.parametrize("which", [0, 1], ids=["records", "cache"])
def test_a_prediction_right_after_a_redis_restart_is_answered(client, worker, redis_servers, which):
    """The API's and the worker's pooled connections went stale with the restart: they reconnect."""
    task = client.post("/tasks", json={**sentiment(tag=f"after-restart-{which}"), "adaptation": {"steps": 1}},
                       headers=auth()).json()
    wait_status(client, task["id"])
    ask = {"task_id": task["id"], "inputs": ["a joy"]}
    assert client.post("/predict", json=ask, headers=auth()).status_code == 200
    redis_servers[which].restart(down_s=1, kill=True)
    r = client.post("/predict", json=ask, headers=auth())
    assert r.status_code == 200, r.text
