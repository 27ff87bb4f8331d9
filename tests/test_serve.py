"""scripts/serve.sh itself, on the tiny model and loopback ports of its own: its predict worker
answers one tenant while another tenant's adaptation runs, and a worker killed outright is started
again while the API stays up (/readyz says not ready meanwhile)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import httpx
import pytest

from conftest import ADMIN_KEY, KEY, OTHER_KEY, ROOT, TMP, free_port, sentiment, wait_for
from test_service_crash import long_body

DATA = TMP / "serve"


@pytest.fixture(scope="module")
def served():
    port = free_port()
    env = {**os.environ, "MAMLSERVE_BASE_MODEL": "tiny", "MAMLSERVE_DATA_DIR": str(DATA), "MAMLSERVE_PORT": str(port),
           "MAMLSERVE_REDIS_PORT": str(free_port()), "MAMLSERVE_CACHE_PORT": str(free_port()),
           "MAMLSERVE_CACHE_MAXMEMORY": "64mb", "MAMLSERVE_API_KEYS": f'{{"{KEY}": "a", "{OTHER_KEY}": "b"}}',
           "MAMLSERVE_ADMIN_KEY": ADMIN_KEY, "MAMLSERVE_ADAPT_MAX_STEPS": "400", "MAMLSERVE_HEARTBEAT_S": "0.5",
           "MAMLSERVE_WORKER_DEAD_AFTER_S": "3", "MAMLSERVE_REAP_EVERY_S": "0.5", "OMP_NUM_THREADS": "1"}
    DATA.mkdir(parents=True, exist_ok=True)
    log = DATA / "serve.log"
    with open(log, "a") as out:
        proc = subprocess.Popen(["scripts/serve.sh"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        def up() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            return "mamlserve is up" in log.read_text()

        wait_for(up, 240, "serve.sh up", every=0.5)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            yield c, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def pid(name: str) -> int:
    return int((DATA / "run" / f"{name}.pid").read_text())


def adapting(c: httpx.Client, tag: str) -> str:
    r = c.post("/tasks", json=long_body(tag, steps=400), headers={"X-API-Key": KEY})
    assert r.status_code == 202, r.text
    tid = r.json()["id"]
    wait_for(lambda: c.get(f"/tasks/{tid}", headers={"X-API-Key": KEY}).json()["status"] == "adapting", 60,
             "the adaptation under way", every=0.1)
    return tid


def test_one_tenants_adaptation_does_not_hold_anothers_predictions(served):
    c, _ = served
    tid = adapting(c, "serve-busy")
    other = c.post("/tasks", json={**sentiment(tag="serve-other"), "adaptation": {"mode": "none"}},
                   headers={"X-API-Key": OTHER_KEY}).json()["id"]
    took = []
    for text in ("a joy", "so dull", "loved it", "a mess", "brilliant"):
        t0 = time.monotonic()
        r = c.post("/predict", json={"task_id": other, "inputs": [text]}, headers={"X-API-Key": OTHER_KEY})
        took.append(time.monotonic() - t0)
        assert r.status_code == 200, r.text
    assert max(took) < 2.0, took
    assert c.get(f"/tasks/{tid}", headers={"X-API-Key": KEY}).json()["status"] == "adapting"  # it overlapped


def test_a_killed_worker_is_started_again_and_the_api_stays_up(served):
    c, proc = served
    tid = adapting(c, "serve-kill")
    before = pid("adapt-worker")
    os.kill(before, signal.SIGKILL)  # the Celery parent process
    wait_for(lambda: c.get("/readyz").status_code == 503, 10, "/readyz saying not ready")
    assert c.get("/healthz").status_code == 200 and proc.poll() is None
    wait_for(lambda: c.get("/readyz").status_code == 200, 120, "/readyz ready again", every=0.5)
    assert pid("adapt-worker") != before
    done = wait_for(lambda: (r := c.get(f"/tasks/{tid}", headers={"X-API-Key": KEY}).json())["status"] == "ready" and r,
                    300, "the adaptation finished", every=0.5)
    assert done["progress"]["step"] == 400
