"""A worker SIGKILLed in the middle of an adaptation: the broker redelivers the task (acks_late,
visibility timeout) to the next worker, and the task ends ready exactly once."""

from __future__ import annotations

from conftest import auth, wait_for, wait_status


def test_worker_killed_during_adaptation_ends_ready_once(client, worker, records):
    words = "the quick brown fox jumps over the lazy dog while the movie was great and i loved it " * 4
    demos = [{"input": f"{words} {i}", "output": "positive" if i % 2 else "negative"} for i in range(8)]
    r = client.post("/tasks", json={"demonstrations": demos, "options": ["positive", "negative"],
                                    "adaptation": {"steps": 60}}, headers=auth())
    assert r.status_code == 202, r.text
    tid = r.json()["id"]
    key = f"ms:task:{tid}"

    def mid_adaptation():
        rec = client.app.state.store.task(tid)
        assert rec["status"] != "ready", "adaptation finished before the worker could be killed"
        return rec["status"] == "adapting" and rec.get("step", 0) >= 2

    wait_for(mid_adaptation, 120, "adaptation under way", every=0.01)
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


def test_recover_puts_back_what_a_dead_worker_left(redis_servers):
    """serve.sh runs worker.recover before its worker: a message taken by a process that died
    unacknowledged is back in its queue at once, not after the (hours-long) visibility timeout."""
    import subprocess
    import sys

    import redis

    from conftest import RECORDS_PORT, ROOT, settings
    from worker.celery_app import make_celery
    from worker.recover import restore_unacked

    url = f"redis://127.0.0.1:{RECORDS_PORT}/8"  # a database no worker consumes
    db = redis.Redis.from_url(url)
    db.flushdb()
    try:
        make_celery(settings(redis_url=url)).send_task("worker.tasks.adapt", args=["x"])
        assert db.llen("adapt") == 1
        # A consumer takes it without acknowledging, then dies without any cleanup.
        take = ("import os; from kombu import Connection; c = Connection(%r); ch = c.default_channel; "
                "m = ch.basic_get('adapt', no_ack=False); assert m is not None; os._exit(0)") % url
        subprocess.run([sys.executable, "-c", take], cwd=ROOT, check=True, timeout=60)
        assert db.llen("adapt") == 0 and db.hlen("unacked") == 1
        assert restore_unacked(url) == 1
        assert db.llen("adapt") == 1 and db.hlen("unacked") == 0
        assert restore_unacked(url) == 0
    finally:
        db.flushdb()
