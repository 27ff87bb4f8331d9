"""Load on a running embedded service: N concurrent /predict calls on one ready task.

    scripts/serve.sh                      # in another terminal
    .venv/bin/python bench/service_load.py --requests 200 --concurrency 16

Creates (or reuses: same demonstrations, same task) one sentiment task, waits until it is
ready, then sends the requests, at most `concurrency` in flight. Only loopback URLs are allowed.
The last line is JSON: p50_ms, p95_ms, rps, errors (and the run's parameters).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from urllib.parse import urlparse

import httpx

TASK = {
    "demonstrations": [
        {"input": "I loved this film", "output": "positive"},
        {"input": "a dull, boring mess", "output": "negative"},
        {"input": "wonderful acting and a clever plot", "output": "positive"},
        {"input": "I want my money back", "output": "negative"},
        {"input": "the best thing I saw this year", "output": "positive"},
        {"input": "two hours I will never get back", "output": "negative"},
    ],
    "options": ["positive", "negative"],
}
INPUTS = ["what a great movie", "terrible plot, awful acting", "I would watch it again", "it put me to sleep"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def main(a: argparse.Namespace) -> dict:
    host = urlparse(a.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1") and not (host or "").startswith("127."):
        sys.exit(f"refusing to load {a.url}: only loopback addresses")
    headers = {"X-API-Key": a.key}
    limits = httpx.Limits(max_connections=a.concurrency, max_keepalive_connections=a.concurrency)
    async with httpx.AsyncClient(base_url=a.url, headers=headers, timeout=a.timeout, limits=limits) as client:
        body = {**TASK, "adaptation": {"mode": a.mode, "steps": a.steps}}
        r = await client.post("/tasks", json=body)
        r.raise_for_status()
        task_id = r.json()["id"]
        deadline = time.monotonic() + a.ready_timeout
        while True:
            status = (await client.get(f"/tasks/{task_id}")).json()
            if status["status"] == "ready":
                break
            if status["status"] == "failed" or time.monotonic() > deadline:
                sys.exit(f"task {task_id} did not become ready: {status}")
            await asyncio.sleep(0.5)
        payload = {"task_id": task_id, "inputs": INPUTS[: a.inputs]}
        await client.post("/predict", json=payload)  # warm: weights in the worker's LRU, prefix encoded

        sem = asyncio.Semaphore(a.concurrency)
        latencies: list[float] = []
        errors = 0

        async def one() -> None:
            nonlocal errors
            async with sem:
                t0 = time.perf_counter()
                try:
                    resp = await client.post("/predict", json=payload)
                    ok = resp.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(a.requests)))
        wall = time.perf_counter() - t0
    return {
        "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "p95_ms": round(percentile(latencies, 0.95), 1) if latencies else None,
        "rps": round(len(latencies) / wall, 2),
        "errors": errors,
        "requests": a.requests, "concurrency": a.concurrency, "inputs_per_request": a.inputs,
        "task_id": task_id, "mode": a.mode, "wall_s": round(wall, 2),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key", default="dev-key")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--inputs", type=int, default=1, choices=range(1, len(INPUTS) + 1), help="inputs per /predict call")
    p.add_argument("--mode", default="lora", choices=["lora", "full", "none"])
    p.add_argument("--steps", type=int, default=2, help="adaptation steps of the task")
    p.add_argument("--timeout", type=float, default=300, help="per request, seconds")
    p.add_argument("--ready-timeout", type=float, default=600)
    print(json.dumps(asyncio.run(main(p.parse_args()))))
