"""Separate machines: the API and two workers, each with a data dir of its own and no shared folder,
one Redis pair. Weights adapted on one worker (LoRA and full mode) predict on the other; a checkpoint
one worker meta-trains is activated and used by the other; kill -9 of a worker during predictions
and during an adaptation loses no prediction and adapts the task once; a worker joining re-queues
nothing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from conftest import ADMIN_KEY, TMP, auth, own_service, sentiment, wait_for, wait_status
from test_service_admin import SMALL, wait_job
from test_service_crash import long_task

DB = 13
ADMIN = auth(ADMIN_KEY)


@pytest.fixture(scope="module")
def machines(redis_servers):
    # The broker redelivers a lost message only after the production timeouts: what recovers a
    # run is the reaper; a dead worker is noticed by the API after 2 s of silence.
    with own_service(db=DB, workers=2, machines=True, visibility_timeout_s="0", adapt_max_steps="600",
                     predict_dead_after_s="2") as service:
        yield service


def only(service, i: int) -> None:
    """Worker i alone alive (as if the other machine were gone)."""
    for j, w in enumerate(service.workers):
        if j != i:
            w.stop()
    if service.workers[i].proc is None or service.workers[i].proc.poll() is not None:
        service.workers[i].start()
    # the API sees the stopped one gone (its heartbeat is removed on a warm stop)
    wait_for(lambda: len(service.client.get("/readyz").json()["workers"]) == 1, 30, "one worker left")


def scores(client, task_id: str) -> list[float]:
    r = client.post("/predict", json={"task_id": task_id, "inputs": ["what a joy"]}, headers=auth())
    assert r.status_code == 200, r.text
    return [s["score"] for s in r.json()["predictions"][0]["scores"]]


def counter(service, worker, name: str) -> float:
    return float(service.client.app.state.store.r.hget(f"ms:metrics:{worker.node()}", name) or 0)


def no_state_on_disk(service) -> None:
    """What the service keeps is in Redis: no machine's data dir holds weights, checkpoints or a bank."""
    for d in [TMP / f"machine-db{DB}-{n}" for n in (0, 1, "api")]:
        found = {p.name for p in Path(d).iterdir()} if Path(d).exists() else set()
        assert not found & {"weights", "checkpoints", "bank"}, (d, found)


def test_weights_adapted_on_one_machine_predict_on_the_other(machines):
    c = machines.client
    only(machines, 0)
    lora = c.post("/tasks", json={**sentiment(tag="m-lora"), "adaptation": {"steps": 3}}, headers=auth()).json()
    full = c.post("/tasks", json={**sentiment(tag="m-full"), "adaptation": {"mode": "full", "steps": 2}},
                  headers=auth()).json()
    on_a = {t["id"]: (wait_status(c, t["id"]), scores(c, t["id"]))[1] for t in (lora, full)}

    only(machines, 1)
    b = machines.workers[1]
    for tid, before in on_a.items():
        assert scores(c, tid) == pytest.approx(before, abs=1e-5)  # the same weights, read from the cache Redis
    assert counter(machines, b, "weights_hit_cache") == 2 and counter(machines, b, "readaptations") == 0
    assert c.app.state.store.task(full["id"])["weights_key"].startswith("weights/")
    no_state_on_disk(machines)


def test_a_checkpoint_meta_trained_on_one_machine_is_used_on_the_other(machines):
    c = machines.client
    only(machines, 1)
    r = c.post("/admin/meta-train", json={"setting": "synthetic", "method": "fomaml", "space": "lora",
                                          "hyperparameters": {"steps": 2, "inner_lr": 0.02, **SMALL}}, headers=ADMIN)
    assert r.status_code == 202, r.text
    job = wait_job(c, r.json()["id"], ("succeeded", "failed"))
    assert job["state"] == "succeeded", job["error"]
    ckpt = job["checkpoint"]

    only(machines, 0)
    assert ckpt in [m["id"] for m in c.get("/admin/checkpoints", headers=ADMIN).json()["items"]]
    assert c.post(f"/admin/checkpoints/{ckpt}/activate", headers=ADMIN).status_code == 200
    try:
        task = c.post("/tasks", json={**sentiment(tag="m-ckpt"), "adaptation": {"steps": 2}}, headers=auth()).json()
        assert task["checkpoint"] == ckpt and task["lr"] == 0.02
        wait_status(c, task["id"])
        assert c.app.state.store.task(task["id"])["worker"] in machines.workers[0].processes()
        scores(c, task["id"])
    finally:
        c.post("/admin/checkpoints/base/activate", headers=ADMIN)
    no_state_on_disk(machines)


class Load:
    """Threads that predict on a task without pause, recording each call's status and seconds."""

    def __init__(self, client, task_id: str, n: int = 4):
        self.client, self.task_id, self.stop = client, task_id, threading.Event()
        self.calls: list[tuple[int, float]] = []
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(n)]

    def run(self, i: int) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            r = self.client.post("/predict", json={"task_id": self.task_id, "inputs": [f"a joy {i}"]}, headers=auth())
            self.calls.append((r.status_code, time.monotonic() - t0))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(180)


def both(service) -> None:
    for w in service.workers:
        if w.proc is None or w.proc.poll() is not None:
            w.start()
    wait_for(lambda: len(service.client.get("/readyz").json()["workers"]) == 2, 30, "both workers live")


def test_kill_9_of_a_worker_holding_predictions_loses_none_and_each_is_answered_within_10_s(machines):
    c = machines.client
    both(machines)
    task = c.post("/tasks", json={**sentiment(tag="m-kill-predict"), "adaptation": {"steps": 1}}, headers=auth()).json()
    wait_status(c, task["id"])
    with Load(c, task["id"]) as load:
        wait_for(lambda: len(load.calls) >= 20, 60, "predictions under way")
        victim = max(machines.workers, key=lambda w: c.app.state.router.inflight[w.node()])
        victim.kill()
        n = len(load.calls)
        wait_for(lambda: len(load.calls) >= n + 40, 60, "predictions after the kill")
    assert {code for code, _ in load.calls} == {200}, load.calls
    assert max(t for _, t in load.calls) < 10, sorted(t for _, t in load.calls)[-5:]


def test_kill_9_during_an_adaptation_and_predictions_then_a_worker_joins(machines):
    """Every prediction gets a 200 (some wait for the surviving worker to finish the adaptation it took
    over); the adaptation ends ready once; the killed worker started again re-queues nothing."""
    c, store = machines.client, machines.client.app.state.store
    both(machines)
    ready = c.post("/tasks", json={**sentiment(tag="m-kill-adapt"), "adaptation": {"steps": 1}}, headers=auth()).json()
    wait_status(c, ready["id"])
    with Load(c, ready["id"], n=2) as load:
        tid = long_task(c, "m-kill-adapt", steps=300)
        runner = machines.runner(tid)
        run = store.task(tid)["run"]
        runner.kill()
        requeued = wait_for(lambda: (r := store.task(tid))["run"] != run and r["status"] == "adapting" and r, 60,
                            "the run taken over by the other worker")
        runner.start()  # it joins while the other adapts
        done = wait_status(c, tid, timeout=300)
    rec = store.task(tid)
    assert done["progress"]["step"] == 300 and rec["run"] == requeued["run"]
    assert rec["attempts"] == 2 and rec["completions"] == 1, rec
    assert store.task(ready["id"])["attempts"] == 1
    assert load.calls and {code for code, _ in load.calls} == {200}, load.calls
