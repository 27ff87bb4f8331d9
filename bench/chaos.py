"""Chaos against the embedded service: scripts/serve.sh on loopback ports and a data dir of its own,
a flooding tenant beside a well-behaved one, and faults one after another while both run:

    .venv/bin/python bench/chaos.py                          # tiny model, ~3 minutes
    .venv/bin/python bench/chaos.py --base-model smollm2 --flood-steps 20

Faults, in order: SIGKILL of the adapt worker (Celery parent and pool child) during adaptations,
SIGKILL of the records Redis and of the cache Redis (serve.sh's supervisor starts each again)
during adaptations and predictions, and malformed bodies. The flooder keeps `--flood` predicts
in flight on its long adaptations (it honours Retry-After); the well-behaved tenant predicts on a
ready task every 0.3 s, from a process of its own, and /healthz is probed from a third.

The last line is JSON: tasks_lost (adaptations not ready at the end), server_errors (responses
>= 500 other than a 503 with Retry-After, and connection errors), well_behaved_p95_s (its predict
latency), healthz_max_s, and the counts behind them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
FLOOD_KEY, GOOD_KEY, ADMIN_KEY = "chaos-flooder-key-0001", "chaos-good-key-00001", "chaos-admin-key-0001"
GOOD = {"demonstrations": [{"input": "I loved this film", "output": "positive"},
                           {"input": "a dull, boring mess", "output": "negative"},
                           {"input": "wonderful acting", "output": "positive"},
                           {"input": "I want my money back", "output": "negative"}],
        "options": ["positive", "negative"]}
MALFORMED = [  # (path, raw body): each must get a 4xx
    ("/tasks", b'{"demonstrations": [{"input": "a", "output": "b"}], "adaptation": {"lr": NaN}}'),
    ("/tasks", b'{"demonstrations": [{"input": "a", "output": "b"}], "adaptation": {"epochs": Infinity}}'),
    ("/tasks", b'{"demonstrations": [{"input": "a", "output": "b"}], "adaptation": {"lr": 1e999}}'),
    ("/tasks", b'{"demonstrations": [{"input": "caf\xe9", "output": "b"}]}'),
    ("/tasks", b'{"demonstrations": [{"input": "a", "output": "b"}'),
    ("/tasks", b"[" * 100_000),
    ("/tasks", b'{"demonstrations": "many"}'),
    ("/tasks", b'{"demonstrations": [' + b'{"input": "' + b"x" * 4000 + b'", "output": "y"},' * 300 + b"]}"),
    ("/predict", b'{"task_id": "x", "inputs": ["a"], "wait_s": NaN}'),
    ("/predict", b'{"task_id": "x", "inputs": [true]}'),
    ("/predict", b""),
    ("/admin/meta-train", b'{"setting": "synthetic", "hyperparameters": {"inner_lr": -Infinity}}'),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else float("nan")


def server_error(r: httpx.Response) -> bool:
    """A 5xx that is not a deliberate, retryable 503."""
    return r.status_code >= 500 and not (r.status_code == 503 and "retry-after" in r.headers)


def long_task(tag: str, steps: int) -> dict:
    words = "the quick brown fox jumps over the lazy dog while the movie was great and i loved it " * 3
    return {"demonstrations": [{"input": f"{words} {tag} {i}", "output": "positive" if i % 2 else "negative"}
                               for i in range(8)], "options": ["positive", "negative"], "adaptation": {"steps": steps}}


# --- the two probes, each in a process of its own (this one's event loop is busy being the flood)

def probe_healthz(url: str, stop, out) -> None:
    took, at, errors = [], [], 0
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                ok = c.get("/healthz").status_code == 200
            except httpx.HTTPError:
                ok = False
            took.append(time.monotonic() - t0)
            at.append(time.time())
            errors += not ok
            time.sleep(0.2)
    out.put({"healthz": took, "healthz_at": at, "healthz_errors": errors})


def well_behaved(url: str, task_id: str, stop, out) -> None:
    took, codes, server_errors = [], {}, 0
    inputs = ["what a great movie", "terrible plot, awful acting", "I would watch it again", "it put me to sleep"]
    with httpx.Client(base_url=url, timeout=120, headers={"X-API-Key": GOOD_KEY}) as c:
        i = 0
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                r = c.post("/predict", json={"task_id": task_id, "inputs": [inputs[i % 4]]})
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                server_errors += server_error(r)
                if r.status_code == 200:
                    took.append(time.monotonic() - t0)
                elif r.status_code in (429, 503):
                    time.sleep(float(r.headers.get("retry-after", 1)))
            except httpx.HTTPError:
                server_errors += 1
            i += 1
            time.sleep(0.3)
    out.put({"good_latency": took, "good_codes": codes, "good_server_errors": server_errors})


# --- the service

class Service:
    def __init__(self, base_model: str, steps: int):
        self.data = Path(tempfile.mkdtemp(prefix="mamlserve-chaos-"))
        self.port, self.redis_port, self.cache_port = free_port(), free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MAMLSERVE_BASE_MODEL": base_model, "MAMLSERVE_DATA_DIR": str(self.data),
                    "MAMLSERVE_PORT": str(self.port), "MAMLSERVE_REDIS_PORT": str(self.redis_port),
                    "MAMLSERVE_CACHE_PORT": str(self.cache_port), "MAMLSERVE_ADMIN_KEY": ADMIN_KEY,
                    "MAMLSERVE_API_KEYS": json.dumps({FLOOD_KEY: "flooder", GOOD_KEY: "good"}),
                    "MAMLSERVE_ADAPT_MAX_STEPS": str(max(400, steps)), "HF_HUB_OFFLINE": "1"}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> None:
        self.log = open(self.data / "serve.log", "w")
        self.proc = subprocess.Popen(["scripts/serve.sh"], cwd=ROOT, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.sh exited; see {self.data / 'serve.log'}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"not ready within {timeout} s")

    def pid(self, name: str) -> int:
        return int((self.data / "run" / f"{name}.pid").read_text())

    def kill(self, name: str) -> None:
        """SIGKILL the process (and, for a worker, its pool children): serve.sh starts it again."""
        pid = self.pid(name)
        children = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _ppid(p) == pid]
        for p in [pid, *children]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        shutil.rmtree(self.data, ignore_errors=True)


def _ppid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# --- the flood and the faults

class Tally:
    def __init__(self):
        self.codes: dict[int, int] = {}
        self.server_errors = 0

    def add(self, r: httpx.Response) -> None:
        self.codes[r.status_code] = self.codes.get(r.status_code, 0) + 1
        self.server_errors += server_error(r)


async def flood_one(c: httpx.AsyncClient, task_id: str, tally: Tally, halt: asyncio.Event) -> None:
    """One of the flooder's predicts in flight: waits on a long adaptation, again and again."""
    while not halt.is_set():
        try:
            r = await c.post("/predict", json={"task_id": task_id, "inputs": ["a great movie"], "wait_s": 30})
            tally.add(r)
            if r.status_code in (429, 503):
                await asyncio.sleep(float(r.headers.get("retry-after", 1)))
        except httpx.HTTPError:
            tally.server_errors += 1
            await asyncio.sleep(1)


async def create(c: httpx.AsyncClient, body: dict, tally: Tally) -> str:
    while True:
        r = await c.post("/tasks", json=body)
        tally.add(r)
        if r.status_code in (200, 202):
            return r.json()["id"]
        if r.status_code != 503:
            raise RuntimeError(f"POST /tasks: {r.status_code} {r.text}")
        await asyncio.sleep(float(r.headers.get("retry-after", 1)))


async def run(args) -> dict:
    svc = Service(args.base_model, args.flood_steps)
    t_start, t_wall = time.monotonic(), time.time()
    svc.start()
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    tally, events, status = Tally(), [], []
    limits = httpx.Limits(max_connections=args.flood + 50, max_keepalive_connections=args.flood + 50)
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=180, limits=limits, headers={"X-API-Key": FLOOD_KEY}) as fc, \
                httpx.AsyncClient(base_url=svc.url, timeout=180, headers={"X-API-Key": GOOD_KEY}) as gc:
            good_icl = await create(gc, {**GOOD, "adaptation": {"mode": "none"}}, tally)
            probes = [ctx.Process(target=probe_healthz, args=(svc.url, stop, out)),
                      ctx.Process(target=well_behaved, args=(svc.url, good_icl, stop, out))]
            for p in probes:
                p.start()
            tracked = [await create(fc, long_task(f"flood-{i}", args.flood_steps), tally) for i in range(args.flood_tasks)]
            tracked.append(await create(gc, {**GOOD, "adaptation": {"steps": 5}}, tally))
            halt = asyncio.Event()
            workers = [asyncio.create_task(flood_one(fc, tracked[i % (len(tracked) - 1)], tally, halt))
                       for i in range(args.flood)]

            async def statuses() -> list[str]:
                got = []
                for tid, key in [(t, FLOOD_KEY) for t in tracked[:-1]] + [(tracked[-1], GOOD_KEY)]:
                    r = await gc.get(f"/tasks/{tid}", headers={"X-API-Key": key})
                    tally.add(r)
                    got.append(r.json()["status"] if r.status_code == 200 else f"http {r.status_code}")
                return got

            async def fault(name: str, action) -> None:
                await asyncio.sleep(args.gap)
                adapting = (await statuses()).count("adapting")
                t0 = time.monotonic()
                await asyncio.to_thread(action)
                events.append({"fault": name, "at_s": round(t0 - t_start, 1), "adapting": adapting,
                               "ready_again_s": round(await asyncio.to_thread(svc.wait_ready, 300), 1)})

            await fault("kill -9 adapt worker", lambda: svc.kill("adapt-worker"))
            await fault("kill -9 records redis", lambda: svc.kill("redis-records"))
            await fault("kill -9 cache redis", lambda: svc.kill("redis-cache"))
            malformed_4xx = 0
            for path, raw in MALFORMED:
                key = ADMIN_KEY if path.startswith("/admin") else GOOD_KEY
                r = await gc.post(path, content=raw, headers={"X-API-Key": key, "content-type": "application/json"})
                tally.add(r)
                malformed_4xx += 400 <= r.status_code < 500
            await asyncio.sleep(args.gap)

            # settle: every adaptation of either tenant must end ready
            deadline = time.monotonic() + args.settle
            status = await statuses()
            while time.monotonic() < deadline and any(v != "ready" for v in status):
                await asyncio.sleep(2)
                status = await statuses()
            halt.set()
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    finally:
        stop.set()
        results = {}
        for _ in range(2):
            try:
                results.update(out.get(timeout=60))
            except Exception:
                pass
        svc.stop()
    good = results.get("good_latency", [])
    return {
        "tasks_lost": sum(v != "ready" for v in status),
        "server_errors": tally.server_errors + results.get("good_server_errors", 0) + results.get("healthz_errors", 0),
        "well_behaved_p95_s": round(percentile(good, 0.95), 3),
        "healthz_max_s": round(max(results.get("healthz", [float("nan")])), 3),
        "tasks": len(tracked), "task_status": sorted(status), "faults": events,
        "malformed_4xx": f"{malformed_4xx}/{len(MALFORMED)}", "flood_codes": tally.codes,
        "good_codes": results.get("good_codes", {}), "good_p50_s": round(percentile(good, 0.5), 3),
        "healthz_p95_s": round(percentile(results.get("healthz", []), 0.95), 3),
        "healthz_max_at_s": round(max(zip(results.get("healthz", [0]), results.get("healthz_at", [t_wall])))[1] - t_wall, 1),
        "base_model": args.base_model, "flood": args.flood, "seconds": round(time.monotonic() - t_start, 1),
    }


def bench_args(doc: str) -> argparse.ArgumentParser:
    """The command line of a bench on serve.sh: its docstring's first paragraph, and --base-model."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--base-model", default="tiny", help="tiny (default: a bounded run anywhere) or smollm2")
    return ap


def bench_main(ap: argparse.ArgumentParser, run) -> None:
    """Parse, run the bench, and print its result as the last line: one JSON object."""
    print(json.dumps(asyncio.run(run(ap.parse_args()))))


def main() -> None:
    ap = bench_args(__doc__)
    ap.add_argument("--flood", type=int, default=300, help="the flooder's predicts in flight")
    ap.add_argument("--flood-tasks", type=int, default=4, help="the flooder's long adaptations")
    ap.add_argument("--flood-steps", type=int, default=400, help="steps of each of them")
    ap.add_argument("--gap", type=float, default=8.0, help="seconds between faults")
    ap.add_argument("--settle", type=float, default=240.0, help="seconds the adaptations get to end after the faults")
    bench_main(ap, run)


if __name__ == "__main__":
    main()
