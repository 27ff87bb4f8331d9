"""Per-tenant quotas (app/quotas.py). Calls in flight are tested under a flood in
test_service_flood.py; here, the adapted weights a tenant's tasks may hold, with a worker and an
API whose limit fits one full-mode task of the tiny model (~410 KB) and not two; then tasks held,
adaptation seconds per hour, size limits and requests per minute with an API of small limits."""

from __future__ import annotations

import base64

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
    from contract.blobs import weights_cache
    from contract.store import task_weights_key

    assert weights_cache(c.app.state.settings).get(task_weights_key(store.task(failed[0]))) is None  # not kept

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


def test_adaptation_seconds_are_counted_per_tenant(service):
    usage = service.client.get("/usage", headers=auth()).json()
    assert usage["adapt_seconds_per_hour"]["used"] > 0 and usage["weights_bytes"]["used"] > 0


@pytest.fixture(scope="module")
def limited(redis_servers):
    """An API with small limits and no worker: every limit here is the API's to enforce."""
    with own_service(db=6, workers=0, max_requests_per_minute="20", max_tasks="3", max_adapt_seconds_per_hour="1",
                     max_adapter_bytes="2000", max_weights_bytes="1000") as s:
        yield s.client


def none_task(tag: str) -> dict:
    return {**sentiment(tag=tag), "adaptation": {"mode": "none"}}


def test_tasks_held_are_bounded_per_tenant(limited):
    ids = [limited.post("/tasks", json=none_task(f"count-{i}"), headers=auth()).json()["id"] for i in range(3)]
    r = limited.post("/tasks", json=none_task("count-3"), headers=auth())
    assert r.status_code == 429 and "the limit is 3 (max_tasks)" in r.json()["detail"] and "retry-after" not in r.headers
    assert limited.post("/tasks", json=none_task("count-0"), headers=auth()).status_code == 200  # an existing one is fine
    assert limited.delete(f"/tasks/{ids[0]}", headers=auth()).status_code == 204
    assert limited.post("/tasks", json=none_task("count-3"), headers=auth()).status_code == 202
    assert limited.get("/usage", headers=auth()).json()["tasks"] == {"used": 3, "limit": 3, "retry_after_s": None}
    for tid in ids[1:]:
        limited.delete(f"/tasks/{tid}", headers=auth())


def test_adaptation_seconds_per_hour_hold_new_adaptations_back(limited):
    store = limited.app.state.store
    store.add_adapt_seconds("tenant-a", 2.0)  # as the worker does when a run ends
    r = limited.post("/tasks", json={**sentiment(tag="seconds"), "adaptation": {"steps": 1}}, headers=auth())
    assert r.status_code == 429 and "(max_adapt_seconds_per_hour)" in r.json()["detail"]
    assert 3500 < int(r.headers["retry-after"]) <= 3600  # when this minute's seconds leave the hour
    use = limited.get("/usage", headers=auth()).json()["adapt_seconds_per_hour"]
    assert use["used"] == 2.0 and use["limit"] == 1 and 3500 < use["retry_after_s"] <= 3600


def test_over_a_size_limit_is_413(limited):
    limited.app.state.store.note_weights_size("full", 5000)  # a full-mode task's weights, as last stored
    r = limited.post("/tasks", json={**sentiment(tag="too-big"), "adaptation": {"mode": "full", "steps": 1}},
                     headers=auth("test-key-tenant-b"))
    assert r.status_code == 413 and "the limit on a tenant's stored weights is 1000 (max_weights_bytes)" in r.json()["detail"]
    r = limited.post("/tasks", json={**sentiment(tag="big-adapter"), "adapter": base64.b64encode(b"x" * 3000).decode()},
                     headers=auth("test-key-tenant-b"))
    assert r.status_code == 413 and "the limit is 2000 (max_adapter_bytes)" in r.json()["detail"]


def test_requests_per_minute_are_bounded_per_tenant(limited):
    used = limited.get("/usage", headers=auth("test-key-tenant-b")).json()["requests_per_minute"]["used"]
    codes = [limited.get("/tasks", headers=auth("test-key-tenant-b")).status_code for _ in range(21 - used)]
    assert codes[:-1] == [200] * (20 - used) and codes[-1] == 429
    r = limited.get("/v1/models", headers={"Authorization": "Bearer test-key-tenant-b"})
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and "(max_requests_per_minute)" in r.json()["error"]["message"]
    assert limited.get("/usage", headers=auth()).status_code == 200  # another tenant's minute is its own
