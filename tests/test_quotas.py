"""Per-tenant quotas (app/quotas.py). Calls in flight are tested under a flood in
test_service_flood.py; here, the adapted weights a tenant's tasks may hold, with a worker and an
API whose limit fits one full-mode task of the tiny model (~410 KB) and not two."""

from __future__ import annotations

import pytest

from conftest import auth, own_service, sentiment, wait_for, wait_status

LIMIT = 600_000


@pytest.fixture(scope="module")
def service(redis_servers):
    with own_service(db=4, max_weights_bytes=str(LIMIT)) as s:
        yield s


def full(tag: str) -> dict:
    return {**sentiment(tag=tag), "adaptation": {"mode": "full", "steps": 1}}


def test_stored_weights_are_bounded_per_tenant(service):
    c, store = service.client, service.client.app.state.store
    # Two at once, before any size is known: the worker stores one and refuses the other.
    ids = [c.post("/tasks", json=full(f"quota-{i}"), headers=auth()).json()["id"] for i in range(2)]
    ends = {}
    for tid in ids:
        ends[tid] = wait_for(lambda tid=tid: (r := c.get(f"/tasks/{tid}", headers=auth()).json())["status"]
                             in ("ready", "failed") and r, 120, "the adaptation done")
    ready = [t for t, r in ends.items() if r["status"] == "ready"]
    failed = [t for t, r in ends.items() if r["status"] == "failed"]
    assert len(ready) == 1 and len(failed) == 1, ends
    assert f"over the limit of {LIMIT} bytes" in ends[failed[0]]["error"]
    held = store.usage("tenant-a", "weights_bytes")
    assert 300_000 < held <= LIMIT and held == store.task(ready[0])["weights_bytes"]
    assert store.task(failed[0]).get("weights_path") is None  # its weights were not kept

    # Now the size of a full-mode task is known: a third is refused at once, with a 429.
    r = c.post("/tasks", json=full("quota-2"), headers=auth())
    assert r.status_code == 429 and f"the limit is {LIMIT}" in r.json()["detail"] and "retry-after" not in r.headers
    r = c.post("/tasks", json={**sentiment(tag="quota-lora"), "adaptation": {"steps": 1}}, headers=auth())
    assert r.status_code == 202, r.text  # a LoRA task is small enough
    wait_status(c, r.json()["id"])
    r = c.post("/tasks", json=full("quota-other"), headers=auth("test-key-tenant-b"))
    assert r.status_code == 202, r.text  # another tenant has a quota of its own

    # Deleting the full-mode task makes room: the refused one, posted again, runs and is kept.
    assert c.delete(f"/tasks/{ready[0]}", headers=auth()).status_code == 204
    assert store.usage("tenant-a", "weights_bytes") < 100_000
    r = c.post("/tasks", json=full(f"quota-{ids.index(failed[0])}"), headers=auth())
    assert r.status_code == 200 and r.json()["id"] == failed[0]
    wait_status(c, failed[0])
