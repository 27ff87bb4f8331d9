"""Schemathesis as its command line runs it, every check (`st run --checks all`), against the API
as deployed (uvicorn), a real Redis and workers for predictions and adaptations: no failure, with
a tenant's key and with the admin key. Bounded: a fixed seed and a fixed number of cases per
operation. No worker takes meta-training: a run the fuzzer starts stays queued, then is dropped.
tests/schemathesis_hooks.py makes positive cases obey the rules JSON Schema cannot state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from conftest import ADMIN_KEY, CACHE_PORT, KEY, RECORDS_PORT, ROOT, TMP, Api, Worker

DB = 5
CASES = 15  # per operation and phase


@pytest.fixture(scope="module")
def api(redis_servers):
    env = {"MAMLSERVE_REDIS_URL": f"redis://127.0.0.1:{RECORDS_PORT}/{DB}",
           "MAMLSERVE_CACHE_REDIS_URL": f"redis://127.0.0.1:{CACHE_PORT}/{DB}",
           "MAMLSERVE_ADAPT_MAX_STEPS": "400", "MAMLSERVE_PREDICT_WAIT_MAX_S": "1"}
    records = redis.Redis(port=RECORDS_PORT, db=DB)
    records.flushdb()
    workers = [Worker(records, env, queues=q, name=f"schema-{q}") for q in ("predict", "adapt")]
    server = Api(env, name="schema-api")
    try:
        for w in workers:
            w.start()
        yield server.start()
    finally:
        server.stop()
        for w in workers:
            w.stop()
        records.flushdb()
        redis.Redis(port=CACHE_PORT, db=DB).flushdb()


@pytest.mark.parametrize("key", [KEY, ADMIN_KEY], ids=["tenant", "admin"])
def test_schemathesis_finds_nothing(api, key):
    cmd = [str(Path(sys.executable).parent / "st"), "--no-color", "run", f"{api}/openapi.json", "--checks", "all",
           "-H", f"X-API-Key: {key}", "--max-examples", str(CASES), "--seed", "13", "--request-timeout", "60"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(ROOT / "tests/schemathesis_hooks.py")}
    # cwd: the CLI keeps a .schemathesis folder where it runs
    run = subprocess.run(cmd, cwd=TMP, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
