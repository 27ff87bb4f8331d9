"""Shared fixtures: two real redis-servers (records + weights cache) on free loopback ports, a real
Celery worker in a subprocess (so a test can SIGKILL it), and the FastAPI app, all on the tiny model.

The service's settings go to the app explicitly and to the worker through its environment;
this process's environment is left alone for the other test modules.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
TMP = Path(tempfile.mkdtemp(prefix="mamlserve-test-"))
atexit.register(shutil.rmtree, TMP, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RECORDS_PORT, CACHE_PORT = free_port(), free_port()
KEY, OTHER_KEY, ADMIN_KEY = "test-key-tenant-a", "test-key-tenant-b", "test-admin-key-0123"
ENV = {
    "MAMLSERVE_BASE_MODEL": "tiny",
    "MAMLSERVE_DATA_DIR": str(TMP / "data"),
    "MAMLSERVE_REDIS_URL": f"redis://127.0.0.1:{RECORDS_PORT}/0",
    "MAMLSERVE_CACHE_REDIS_URL": f"redis://127.0.0.1:{CACHE_PORT}/0",
    "MAMLSERVE_API_KEYS": f'{{"{KEY}": "tenant-a", "{OTHER_KEY}": "tenant-b"}}',
    "MAMLSERVE_ADMIN_KEY": ADMIN_KEY,
    "MAMLSERVE_ENV": "development",
    "MAMLSERVE_ADAPT_MAX_STEPS": "60",
    # Runs of a set number of steps (600 in the reaper test) end by their steps on a loaded machine,
    # not by the 300 s budget; tests/test_adapt_progress.py tests the budget.
    "MAMLSERVE_ADAPT_TIME_BUDGET_S": "3600",
    "MAMLSERVE_WORKER_LRU_SIZE": "2",
    "MAMLSERVE_MAX_REQUEST_BYTES": "200000",
    "MAMLSERVE_MAX_UPLOAD_BYTES": "2000000",
    "MAMLSERVE_PREDICT_TIMEOUT_S": "120",
    # A killed worker's task comes back after this (production: the longest time limit + 10 min).
    "MAMLSERVE_VISIBILITY_TIMEOUT_S": "4",
    # Heartbeats and the reaper at test speed: a run whose worker is gone is queued again within seconds.
    "MAMLSERVE_HEARTBEAT_S": "0.5",
    "MAMLSERVE_WORKER_DEAD_AFTER_S": "3",
    "MAMLSERVE_REAP_EVERY_S": "0.5",
    "MAMLSERVE_ENQUEUE_GRACE_S": "2",
    "OMP_NUM_THREADS": "1",  # two cores shared by the worker and the tests
    # Status polls every 0.1 s would exceed the default; tests/test_quotas.py tests the limit with its own.
    "MAMLSERVE_MAX_REQUESTS_PER_MINUTE": "1000000",
}

from model.settings import Settings  # noqa: E402

LIMITS_TOKENS = Settings.model_fields["max_predict_tokens"].default


def settings(**overrides) -> Settings:
    """The test settings, given explicitly: other test modules in the session keep their environment."""
    keep = dict(os.environ)
    try:
        os.environ.update(ENV)
        return Settings(**overrides)
    finally:
        os.environ.clear()
        os.environ.update(keep)


def wait_for(check, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    raise TimeoutError(f"{what} did not happen within {timeout} s")


class RedisServer:
    def __init__(self, port: int, name: str, *args: str):
        self.port, self.dir, self.args = port, TMP / name, args
        self.dir.mkdir(parents=True, exist_ok=True)
        self.client = redis.Redis(port=port)
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--daemonize", "no", "--logfile", str(self.dir / "redis.log"), *self.args],
        )
        wait_for(self._ping, 10, f"redis-server on {self.port}")

    def restart(self, down_s: float = 0.0, kill: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL: clients find the port closed at once), stay down, start again
        (from the AOF where there is one: every acknowledged write is in it, even after SIGKILL)."""
        if kill:
            self.proc.kill()
            self.proc.wait(10)
        else:
            self.stop()
        time.sleep(down_s)
        self.start()

    def _ping(self) -> bool:
        try:
            return self.client.ping()
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Worker:
    """The celery command of scripts/worker.sh, in its own process group. Without worker.sh's recover
    step: the crash test must see the broker's own redelivery (recover has a test of its own)."""

    def __init__(self, records: redis.Redis, env: dict[str, str] | None = None, queues: str = "predict,adapt,meta",
                 name: str = "worker"):
        self.records, self.env, self.queues = records, {**ENV, **(env or {})}, queues
        self.proc: subprocess.Popen | None = None
        self.log = TMP / f"{name}.log"

    def start(self) -> None:
        with open(self.log, "a") as out:  # the child keeps its own copy of the descriptor
            self.proc = self._spawn(out)
        # Ready when the pool child has loaded the model (its heartbeat appears).
        wait_for(lambda: self.processes() or self._died(), 120, "the worker loading the model")

    def processes(self) -> list[str]:
        """This worker's processes in the heartbeats ("host:pid"; its pool child, once the model is loaded)."""
        def mine(name: str) -> bool:
            try:
                return os.getpgid(int(name.rsplit(":", 1)[1])) == self.proc.pid
            except (ProcessLookupError, ValueError):
                return False

        return [k for k in (n.decode() for n in self.records.hkeys("ms:workers")) if mine(k)]

    def node(self) -> str:
        """The Celery node name its processes beat under (the worker label of /metrics)."""
        import json

        return json.loads(self.records.hget("ms:workers", self.processes()[0]))["node"]

    def _spawn(self, out) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-P", "prefork", "-c", "1",
             "-Q", self.queues, "--loglevel", "INFO", "-n", f"test-{time.monotonic_ns()}@%h"],
            cwd=ROOT, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def _died(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}; see {self.log}:\n{self.log.read_text()[-3000:]}")
        return False

    def kill(self) -> None:
        """SIGKILL the whole worker (parent and pool child): no chance to requeue or clean up."""
        os.killpg(self.proc.pid, signal.SIGKILL)  # its heartbeat goes stale, as after a real crash
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class Api:
    """uvicorn serving app.main:app in its own process, as scripts/api.sh runs it, with these settings."""

    def __init__(self, env: dict[str, str] | None = None, name: str = "api"):
        self.env, self.log = {**ENV, **(env or {})}, TMP / f"{name}.log"
        self.url = ""
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        import httpx

        port = free_port()
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port),
                 "--log-level", "warning"], cwd=ROOT, env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "uvicorn serving", every=0.2)
        return self.url

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@dataclass
class OwnService:
    client: Any  # a TestClient of the service's API
    workers: list[Worker]

    def runner(self, task_id: str) -> Worker:
        """The worker whose process claimed the task's run."""
        on = self.client.app.state.store.task(task_id)["worker"]
        return next(w for w in self.workers if on in w.processes())


@contextmanager
def own_service(db: int, workers: int = 1, machines: bool = False, **overrides: str):
    """Workers and an API of their own, on Redis databases `db` (records and cache) no other test
    uses, with these settings: for tests that need settings of their own. Needs redis_servers.
    machines: the API and each worker get a data dir of their own, as on separate machines."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    over = {"redis_url": f"redis://127.0.0.1:{RECORDS_PORT}/{db}", "cache_redis_url": f"redis://127.0.0.1:{CACHE_PORT}/{db}",
            **overrides}
    records, cache = redis.Redis(port=RECORDS_PORT, db=db), redis.Redis(port=CACHE_PORT, db=db)
    records.flushdb()
    cache.flushdb()
    env = {f"MAMLSERVE_{k.upper()}": v for k, v in over.items()}
    def own(name) -> dict[str, str]:
        return {"data_dir": str(TMP / f"machine-db{db}-{name}")} if machines else {}

    ws = [Worker(records, {**env, **{f"MAMLSERVE_{k.upper()}": v for k, v in own(i).items()}}, name=f"worker-db{db}-{i}")
          for i in range(workers)]
    try:
        for w in ws:
            w.start()
        with TestClient(create_app(settings(**over, **own("api")))) as c:
            yield OwnService(c, ws)
    finally:
        for w in ws:
            w.stop()
        records.flushdb()
        cache.flushdb()


@pytest.fixture(scope="session")
def redis_servers():
    records = RedisServer(RECORDS_PORT, "records", "--appendonly", "yes", "--maxmemory-policy", "noeviction")
    cache = RedisServer(CACHE_PORT, "cache", "--appendonly", "no", "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")
    yield records, cache
    cache.stop()
    records.stop()
    shutil.rmtree(TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def worker(redis_servers):
    w = Worker(redis_servers[0].client)
    w.start()
    yield w
    w.stop()


@pytest.fixture(scope="session")
def app(redis_servers):
    from app.main import create_app

    return create_app(settings())


@pytest.fixture(scope="session")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


@pytest.fixture
def records(redis_servers) -> redis.Redis:
    return redis_servers[0].client


@pytest.fixture
def cache(redis_servers) -> redis.Redis:
    return redis_servers[1].client


def auth(key: str = KEY) -> dict[str, str]:
    return {"X-API-Key": key}


def sentiment(n: int = 6, tag: str = "") -> dict:
    """A small option task; `tag` makes its content (and so its id) unique to a test."""
    good = ["great fun", "loved it", "a joy", "wonderful", "so good", "brilliant"]
    bad = ["boring", "hated it", "a mess", "terrible", "so bad", "dull"]
    demos = []
    for i in range(n):
        demos.append({"input": f"{good[i % 6]} {tag}".strip(), "output": "positive"} if i % 2 == 0
                     else {"input": f"{bad[i % 6]} {tag}".strip(), "output": "negative"})
    return {"demonstrations": demos, "options": ["positive", "negative"]}


def wait_status(client, task_id: str, want: str = "ready", timeout: float = 120, key: str = KEY) -> dict:
    def check():
        r = client.get(f"/tasks/{task_id}", headers=auth(key))
        assert r.status_code == 200, r.text
        body = r.json()
        if body["status"] == "failed" and want != "failed":
            raise AssertionError(f"task failed: {body['error']}")
        return body if body["status"] == want else None

    return wait_for(check, timeout, f"task {task_id} {want}", every=0.1)
