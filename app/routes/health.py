"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel, Field

from app.bodies import StrictRoute
from app.deps import CeleryDep, SettingsDep, StoreDep

router = APIRouter(tags=["health"], route_class=StrictRoute)


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    redis: bool
    cache: bool
    workers: list[str]
    queues: dict[str, list[str]] = Field(description="each queue's consuming workers; ready needs predict and adapt")
    models: list[str]  # worker processes with the model loaded


NEEDED = ("predict", "adapt")  # meta-training is an admin's: its worker may be away


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up. Async: it answers on the event loop even when every thread is busy."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready, "description": "not ready"}})
def readyz(request: Request, response: Response, s: SettingsDep, store: StoreDep, celery: CeleryDep) -> Ready:
    """Both Redis reachable, a live worker on each of the predict and adapt queues, and a worker
    process with the model loaded."""
    def ok(fn) -> bool:
        try:
            return bool(fn())
        except Exception:
            return False

    redis_ok = ok(store.r.ping)
    cache_ok = ok(request.app.state.cache.ping)
    replies: dict[str, list[dict]] = {}
    queues: dict[str, list[str]] = {}
    models: list[str] = []
    if redis_ok:
        try:  # asks the workers now: a worker that died is missing at once, not after its heartbeat ages
            replies = celery.control.inspect(timeout=1.0).active_queues() or {}
        except Exception:
            replies = {}
        for name, consumed in replies.items():
            for q in consumed:
                queues.setdefault(q["name"], []).append(name)
        live = store.live_workers(s.worker_dead_after_s)
        models = sorted(f"{proc}: {info['model']} on {info['device']}" for proc, info in live.items())
    ready = redis_ok and cache_ok and all(queues.get(q) for q in NEEDED) and bool(models)
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Ready(ready=ready, redis=redis_ok, cache=cache_ok, workers=sorted(replies),
                 queues={q: sorted(w) for q, w in queues.items()}, models=models)
