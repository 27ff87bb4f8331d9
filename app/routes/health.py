"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel

from app.bodies import StrictJSONRoute
from app.deps import CeleryDep, SettingsDep, StoreDep

router = APIRouter(tags=["health"], route_class=StrictJSONRoute)


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    redis: bool
    cache: bool
    workers: list[str]
    models: list[str]  # worker processes with the model loaded


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up. Async: it answers on the event loop even when every thread is busy."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready, "description": "not ready"}})
def readyz(request: Request, response: Response, s: SettingsDep, store: StoreDep, celery: CeleryDep) -> Ready:
    """Redis reachable, a worker answering a ping, and a worker process with the model loaded."""
    def ok(fn) -> bool:
        try:
            return bool(fn())
        except Exception:
            return False

    redis_ok = ok(store.r.ping)
    cache_ok = ok(request.app.state.cache.ping)
    workers: list[str] = []
    models: list[str] = []
    if redis_ok:
        try:
            workers = sorted(name for reply in celery.control.ping(timeout=1.0) for name in reply)
        except Exception:
            workers = []
        live = store.live_workers(s.worker_dead_after_s)
        models = sorted(f"{proc}: {info['model']} on {info['device']}" for proc, info in live.items())
    ready = redis_ok and cache_ok and bool(workers) and bool(models)
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Ready(ready=ready, redis=redis_ok, cache=cache_ok, workers=workers, models=models)
