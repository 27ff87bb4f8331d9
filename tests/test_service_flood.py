"""A tenant flooding /predict, against the API as deployed (uvicorn in its own process), a real
Redis and a real worker: waiting calls hold no thread, a tenant's calls in flight are bounded
(429 with Retry-After beyond), and /healthz and the other tenants keep their answers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import pytest

from conftest import KEY, OTHER_KEY, Api, sentiment
from test_service_crash import long_body

WAITING = 20  # the quota of calls in flight per tenant, for this API
FLOOD = 300  # more than the 256 threads a blocking /predict once had


@pytest.fixture(scope="module")
def api(worker):
    server = Api({"MAMLSERVE_MAX_WAITING_PREDICTS": str(WAITING), "MAMLSERVE_ADAPT_MAX_STEPS": "400"}, name="flood-api")
    yield server.start()
    server.stop()


PROBE = """
import json, sys, time, httpx
took = []
with httpx.Client(base_url=sys.argv[1], timeout=30) as c:
    for _ in range(20):
        t0 = time.monotonic()
        assert c.get("/healthz").status_code == 200
        took.append(time.monotonic() - t0)
        time.sleep(0.05)
print(json.dumps(took))
"""


async def flood(url: str) -> tuple[list[httpx.Response], list[float], httpx.Response]:
    limits = httpx.Limits(max_connections=FLOOD + 50, max_keepalive_connections=FLOOD + 50)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=180) as c:
        r = await c.post("/tasks", json=long_body("flood", steps=400), headers={"X-API-Key": KEY})
        assert r.status_code == 202, r.text
        tid = r.json()["id"]
        body = {"task_id": tid, "inputs": ["a great movie"], "wait_s": 60}
        calls = [asyncio.create_task(c.post("/predict", json=body, headers={"X-API-Key": KEY})) for _ in range(FLOOD)]
        # Every call over the quota refused; the admitted ones wait for the task, holding no thread.
        deadline = time.monotonic() + 90
        while sum(t.done() for t in calls) < FLOOD - WAITING and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        # /healthz from another process: this one's event loop is busy being the flood
        probe = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", PROBE, url], capture_output=True,
                                        text=True, timeout=120)
        assert probe.returncode == 0, probe.stderr
        # A fresh connection: the flood's idle keep-alive ones may be closed by uvicorn (5 s) just as
        # a request goes out on them, which no client survives for a POST.
        async with httpx.AsyncClient(base_url=url, timeout=60) as fresh:
            other = await fresh.post("/tasks", json={**sentiment(tag="flood-other"), "adaptation": {"mode": "none"}},
                                     headers={"X-API-Key": OTHER_KEY})
            gone = await fresh.delete(f"/tasks/{tid}", headers={"X-API-Key": KEY})
        assert gone.status_code == 204  # the waiting ones: 404
        return list(await asyncio.gather(*calls)), json.loads(probe.stdout), other


def test_a_flood_of_waiting_predicts_is_bounded_per_tenant_and_healthz_stays_fast(api):
    replies, health, other = asyncio.run(flood(api))
    codes = [r.status_code for r in replies]
    assert codes.count(404) == WAITING and codes.count(429) == FLOOD - WAITING, sorted(set(codes))
    refused = next(r for r in replies if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1 and f"the limit is {WAITING}" in refused.json()["detail"]
    assert max(health) < 0.25, health  # the goal is 0.1 s; this machine's 2 cores are shared with other work
    assert other.status_code == 202, other.text  # another tenant's requests still go through
