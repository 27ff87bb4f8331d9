"""Idempotency-Key on POST /tasks and POST /admin/meta-train (app/idempotency.py): the same key and
body get the first answer again and do the work once; another body with the key is a 409."""

from __future__ import annotations

import pytest

from conftest import ADMIN_KEY, auth, sentiment

pytestmark = pytest.mark.usefixtures("worker")
SMALL = {"tasks_per_step": 1, "support_size": 4, "support_batch": 2, "query_size": 2, "context_tokens": 128}


def test_a_task_posted_again_with_its_key_gets_the_first_answer(client, records):
    body = {**sentiment(tag="idem"), "adaptation": {"steps": 2}}
    first = client.post("/tasks", json=body, headers={**auth(), "Idempotency-Key": "k-1"})
    assert first.status_code == 202, first.text
    again = client.post("/tasks", json=body, headers={**auth(), "Idempotency-Key": "k-1"})
    # without a key a repeat is answered 200 with the record as it is now; with one, the first answer
    assert again.status_code == 202 and again.json() == first.json() and again.headers["location"] == first.headers["location"]
    assert int(records.hget(f"ms:task:{first.json()['id']}", "attempts") or 0) <= 1
    other = client.post("/tasks", json={**body, "adaptation": {"steps": 3}}, headers={**auth(), "Idempotency-Key": "k-1"})
    assert other.status_code == 409 and "another body" in other.json()["detail"]
    # keys are the tenant's own: another tenant's k-1 is a new request
    theirs = client.post("/tasks", json=body, headers={**auth("test-key-tenant-b"), "Idempotency-Key": "k-1"})
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


def test_a_failed_request_lets_its_key_go(client):
    bad = {"demonstrations": [{"input": "a", "output": "b"}], "options": ["x", "y"]}
    r = client.post("/tasks", json=bad, headers={**auth(), "Idempotency-Key": "k-fail"})
    assert r.status_code == 422
    good = {**sentiment(tag="idem-after-fail"), "adaptation": {"mode": "none"}}
    r = client.post("/tasks", json=good, headers={**auth(), "Idempotency-Key": "k-fail"})
    assert r.status_code == 202, r.text


def test_a_meta_training_run_posted_twice_with_its_key_starts_once(client, records):
    body = {"setting": "synthetic", "method": "metaicl", "hyperparameters": {"steps": 100000, **SMALL}}
    admin = {**auth(ADMIN_KEY), "Idempotency-Key": "run-1"}
    jobs = records.zcard("ms:jobs")
    first = client.post("/admin/meta-train", json=body, headers=admin)
    assert first.status_code == 202, first.text
    try:
        again = client.post("/admin/meta-train", json=body, headers=admin)
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        assert records.zcard("ms:jobs") == jobs + 1
        other = client.post("/admin/meta-train", json={**body, "method": "fomaml"}, headers=admin)
        assert other.status_code == 409 and "another body" in other.json()["detail"]
    finally:
        client.post(f"/admin/jobs/{first.json()['id']}/cancel", headers=auth(ADMIN_KEY))
