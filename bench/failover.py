"""Failover of predictions: scripts/serve.sh with two workers (MAMLSERVE_WORKERS=2) on loopback ports
and a data dir of its own, predictions at a steady concurrency across both, and kill -9 of one
worker (Celery parent and pool child; serve.sh's supervisor starts it again, and it joins back):

    .venv/bin/python bench/failover.py                          # tiny model, ~2 minutes
    .venv/bin/python bench/failover.py --base-model smollm2 --concurrency 4

The service runs with its default settings (heartbeat 1 s, a worker silent for
predict_dead_after_s = 4 s is dead), but for the per-tenant request quota, lifted. Every call is
one /predict of one input on one ready task; a call that fails is counted and not retried. The
last line is JSON: requests, errors (anything but a 200, connection errors included),
max_latency_s and p99_latency_s over all calls, and the same after the kill, with the counts
behind them (resent: the batches the API sent again to the other worker, from its log).
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from chaos import FLOOD_KEY, GOOD, Service, bench_args, bench_main, percentile


async def predict_loop(c: httpx.AsyncClient, task_id: str, calls: list, halt: asyncio.Event, i: int) -> None:
    texts = ["what a great movie", "terrible plot, awful acting", "I would watch it again", "it put me to sleep"]
    n = 0
    while not halt.is_set():
        t0 = time.monotonic()
        try:
            r = await c.post("/predict", json={"task_id": task_id, "inputs": [texts[(i + n) % 4]]})
            code = r.status_code
        except httpx.HTTPError as e:
            code = type(e).__name__
        calls.append((t0, time.monotonic() - t0, code))
        n += 1


def summary(calls: list) -> dict:
    took = [t for _, t, _ in calls]
    return {"requests": len(calls), "errors": sum(code != 200 for _, _, code in calls),
            "max_latency_s": round(max(took, default=0.0), 3), "p99_latency_s": round(percentile(took, 0.99), 3)}


async def run(args) -> dict:
    svc = Service(args.base_model, steps=0)
    # The per-tenant request quota (600 a minute) would answer most of a steady load with 429s: this
    # measures failover, not quotas.
    svc.env.update({"MAMLSERVE_WORKERS": str(args.workers), "MAMLSERVE_CACHE_MAXMEMORY": "256mb",
                    "MAMLSERVE_MAX_REQUESTS_PER_MINUTE": str(10**9)})
    svc.start()
    try:
        async with httpx.AsyncClient(base_url=svc.url, timeout=300, headers={"X-API-Key": FLOOD_KEY}) as c:
            r = await c.post("/tasks", json={**GOOD, "adaptation": {"steps": args.steps}})
            task_id = r.json()["id"]
            while (status := (await c.get(f"/tasks/{task_id}")).json()["status"]) != "ready":
                if status == "failed":
                    raise RuntimeError("the task predicted on failed to adapt")
                await asyncio.sleep(0.5)
            while len((await c.get("/readyz")).json()["workers"]) < args.workers:
                await asyncio.sleep(0.5)
            calls: list = []
            halt = asyncio.Event()
            loops = [asyncio.create_task(predict_loop(c, task_id, calls, halt, i)) for i in range(args.concurrency)]
            await asyncio.sleep(args.before)
            killed_at = time.monotonic()
            svc.kill("worker-1")
            await asyncio.sleep(args.after)
            halt.set()
            await asyncio.gather(*loops)
            ready = (await c.get("/readyz")).json()
        # the API's log (serve.sh's output): each batch it sent again because its worker died
        resent = (svc.data / "serve.log").read_text(errors="replace").count("its worker is gone")
    finally:
        svc.stop()
    after = [x for x in calls if x[0] + x[1] >= killed_at]  # the calls in flight at the kill, and all later
    return {**summary(calls), "after_kill": summary(after), "resent": resent,
            "workers_at_end": len(ready["workers"]),
            "codes": sorted({str(code) for _, _, code in calls}), "base_model": args.base_model,
            "concurrency": args.concurrency, "kill_at_s": args.before}


def main() -> None:
    ap = bench_args(__doc__)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8, help="predictions in flight at all times")
    ap.add_argument("--steps", type=int, default=2, help="adaptation steps of the task predicted on")
    ap.add_argument("--before", type=float, default=15.0, help="seconds of steady load before the kill")
    ap.add_argument("--after", type=float, default=30.0, help="seconds of load after it (the worker rejoins)")
    bench_main(ap, run)


if __name__ == "__main__":
    main()
