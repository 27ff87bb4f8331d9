"""Meta-training through the admin API on a real worker: job -> checkpoint -> listed -> activated ->
new tasks start from it; and cancelling a running job."""

from __future__ import annotations

import pytest

import json

from conftest import ADMIN_KEY, TMP, auth, sentiment, wait_for, wait_status
from model.recipe import LR

pytestmark = pytest.mark.usefixtures("worker")
ADMIN = auth(ADMIN_KEY)
SMALL = {"tasks_per_step": 1, "support_size": 4, "support_batch": 2, "query_size": 2, "context_tokens": 128}


def wait_job(client, job_id: str, states: tuple[str, ...], timeout: float = 180) -> dict:
    def check():
        r = client.get(f"/admin/jobs/{job_id}", headers=ADMIN)
        assert r.status_code == 200, r.text
        return r.json() if r.json()["state"] in states else None

    return wait_for(check, timeout, f"job {job_id} in {states}", every=0.2)


def test_meta_train_job_checkpoint_listed_and_activatable(client):
    r = client.post("/admin/meta-train", json={"setting": "synthetic", "method": "fomaml", "space": "lora",
                                               "hyperparameters": {"steps": 2, "inner_lr": 0.02, **SMALL}}, headers=ADMIN)
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], ("succeeded", "failed"))
    assert job["state"] == "succeeded", job["error"]
    assert job["progress"] == {"step": 2, "steps": 2} and "query_loss" in job["metrics"]
    ckpt = job["checkpoint"]

    listing = client.get("/admin/checkpoints", headers=ADMIN).json()
    assert ckpt in [c["id"] for c in listing["items"]]
    meta = next(c for c in listing["items"] if c["id"] == ckpt)
    assert meta["method"] == "fomaml" and meta["space"] == "lora" and not meta["active"]

    r = client.post(f"/admin/checkpoints/{ckpt}/activate", headers=ADMIN)
    assert r.status_code == 200 and r.json()["active"] == ckpt
    try:
        task = client.post("/tasks", json={**sentiment(tag="from-ckpt"), "adaptation": {"steps": 2}}, headers=auth()).json()
        assert task["checkpoint"] == ckpt
        assert task["lr"] == 0.02  # adapted with the step size it was meta-trained for
        wait_status(client, task["id"])
        r = client.post("/predict", json={"task_id": task["id"], "inputs": ["a joy"]}, headers=auth())
        assert r.status_code == 200, r.text
        # in context only, on the checkpoint's LoRA: its adapter is the checkpoint's
        task = client.post("/tasks", json={**sentiment(tag="ckpt-icl"), "adaptation": {"mode": "none"}}, headers=auth()).json()
        assert client.get(f"/tasks/{task['id']}/adapter", headers=auth()).status_code == 200
    finally:
        assert client.post("/admin/checkpoints/base/activate", headers=ADMIN).json()["active"] == "base"
    # naming a checkpoint explicitly works whatever is active
    task = client.post("/tasks", json={**sentiment(tag="named-ckpt"), "checkpoint": ckpt, "adaptation": {"steps": 1}},
                       headers=auth()).json()
    assert task["checkpoint"] == ckpt and task["lr"] == 0.02
    # an explicit lr wins; another space (full) keeps the settings' default; so does the base model
    lrs = [client.post("/tasks", json={**sentiment(tag=f"lr-{i}"), "checkpoint": c, "adaptation": a},
                       headers=auth()).json()["lr"]
           for i, (c, a) in enumerate([(ckpt, {"steps": 1, "lr": 0.005}), (ckpt, {"mode": "full", "steps": 1}),
                                       ("base", {"steps": 1})])]
    assert lrs == [0.005, LR["full"], LR["lora"]]


def test_cancel_running_job(client):
    r = client.post("/admin/meta-train", json={"setting": "synthetic", "method": "metaicl",
                                               "hyperparameters": {"steps": 100000, **SMALL}}, headers=ADMIN)
    job_id = r.json()["id"]
    wait_for(lambda: client.get(f"/admin/jobs/{job_id}", headers=ADMIN).json()["progress"].get("step", 0) >= 1,
             120, "the run under way", every=0.2)
    r = client.post(f"/admin/jobs/{job_id}/cancel", headers=ADMIN)
    assert r.status_code == 200, r.text
    job = wait_job(client, job_id, ("cancelled", "failed", "succeeded"))
    assert job["state"] == "cancelled" and job["checkpoint"]
    listing = client.get("/admin/checkpoints", headers=ADMIN).json()["items"]
    assert next(c for c in listing if c["id"] == job["checkpoint"])["status"] == "stopped"
    assert client.post(f"/admin/jobs/{job_id}/cancel", headers=ADMIN).status_code == 409


def test_jobs_are_listed_newest_first_with_a_state_filter(client):
    store = client.app.state.store
    for i, state in enumerate(("succeeded", "failed", "succeeded")):
        store.create_job(f"listed-{i}", {"setting": "synthetic", "method": "maml", "space": "lora", "hyperparameters": {},
                                         "state": state, "progress": {}, "metrics": {}, "cancel": False})
    page = client.get("/admin/jobs", params={"limit": 100}, headers=ADMIN).json()
    ids = [j["id"] for j in page["items"]]
    assert ids.index("listed-2") < ids.index("listed-1") < ids.index("listed-0") and page["total"] == len(ids)
    ok = client.get("/admin/jobs", params={"state": "succeeded", "limit": 100}, headers=ADMIN).json()["items"]
    assert {"listed-0", "listed-2"} <= {j["id"] for j in ok} and all(j["state"] == "succeeded" for j in ok)
    both = client.get("/admin/jobs", params={"state": ["succeeded", "failed"], "limit": 2}, headers=ADMIN).json()
    assert len(both["items"]) == 2 and both["next_offset"] == 2
    assert client.get("/admin/jobs", params={"state": "done"}, headers=ADMIN).status_code == 422
    assert client.get("/admin/jobs", headers=auth()).status_code == 403


def test_cancel_queued_job(client, records):
    # A job cancelled before a worker takes it: the worker, given its message, leaves it cancelled.
    store = client.app.state.store
    store.create_job("queued-job", {"setting": "synthetic", "method": "maml", "space": "lora", "hyperparameters": {},
                                    "state": "queued", "progress": {}, "metrics": {}, "cancel": False})
    r = client.post("/admin/jobs/queued-job/cancel", headers=ADMIN)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    from contract.queues import queue

    result = client.app.state.celery.send_task("worker.tasks.meta_train", args=["queued-job"],
                                               queue=queue("meta", client.app.state.fingerprint))
    assert result.get(timeout=60) == "done"
    job = client.get("/admin/jobs/queued-job", headers=ADMIN).json()
    assert job["state"] == "cancelled" and job["started_at"] is None and job["checkpoint"] is None


def test_meta_train_without_the_bank_is_409_naming_the_command_and_makes_no_job(client, records):
    jobs = records.zcard("ms:jobs")
    r = client.post("/admin/meta-train", json={"setting": "class_to_class"}, headers=ADMIN)
    assert r.status_code == 409, r.text
    assert "python -m model.bank build" in r.json()["detail"] and str(TMP) not in r.text
    assert records.zcard("ms:jobs") == jobs
    r = client.post("/admin/meta-train", json={"setting": "no_such_setting"}, headers=ADMIN)
    assert r.status_code == 422 and "no setting 'no_such_setting'; known: synthetic, " in r.text
    assert records.zcard("ms:jobs") == jobs


def test_no_response_names_a_server_path(client):
    """Not in a 422 naming an unknown checkpoint, a 404 activating one, a task's error from the worker
    (a damaged checkpoint) or the checkpoint listing (a checkpoint's meta may name a data dir)."""
    r = client.post("/tasks", json={**sentiment(tag="leak"), "checkpoint": "v0042-none"}, headers=auth())
    assert r.status_code == 422 and "no checkpoint 'v0042-none'" in r.text and str(TMP) not in r.text, r.text
    r = client.post("/admin/checkpoints/v0042-none/activate", headers=ADMIN)
    assert r.status_code == 404 and str(TMP) not in r.text, r.text

    from contract.blobs import shared

    registry, damaged = shared(client.app.state.settings), "v0901-damaged"  # a meta.json alone: no weights
    registry.put(f"checkpoints/{damaged}/meta.json", json.dumps({"id": damaged, "data_dir": str(TMP / "data")}).encode())
    try:
        task = client.post("/tasks", json={**sentiment(tag="leak-ckpt"), "checkpoint": damaged,
                                           "adaptation": {"steps": 1}}, headers=auth()).json()
        failed = wait_status(client, task["id"], want="failed")
        assert failed["error"] and str(TMP) not in failed["error"], failed["error"]
        r = client.post("/predict", json={"task_id": task["id"], "inputs": ["a"]}, headers=auth())
        assert r.status_code == 409 and str(TMP) not in r.text
        listing = client.get("/admin/checkpoints", headers=ADMIN)
        assert damaged in listing.text and str(TMP) not in listing.text
    finally:
        registry.delete(f"checkpoints/{damaged}/meta.json")
