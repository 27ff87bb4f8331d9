"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel, Field

from app.bodies import StrictRoute
from app.deps import SettingsDep, StoreDep
from contract.config import differences

router = APIRouter(tags=["health"], route_class=StrictRoute)


class Health(BaseModel):
    status: str


class Mismatch(BaseModel):
    worker: str = Field(description="the worker (Celery node) whose configuration differs from the API's")
    fingerprint: str
    differs: list[str] = Field(description="what differs, field by field (model sha256, dtype, lora.*, prompt_format)")


class Shipped(BaseModel):
    id: str = Field(description="the checkpoint that ships with the service for this base model")
    installed: bool = Field(description="verified and in the registry (GET /admin/checkpoints lists it, with its "
                            "evaluation)")
    refused: str | None = Field(None, description="why it was refused (a damaged file, another model or LoRA "
                                "layout): new tasks then start from the base model")


class CheckpointInfo(BaseModel):
    active: str = Field(description="the checkpoint new tasks start from unless they name one ('base': the base model)")
    shipped: Shipped | None = Field(description="the shipped checkpoint as the last worker to start found it "
                                    "(null: none ships for this model)")


class Ready(BaseModel):
    ready: bool
    redis: bool
    cache: bool
    fingerprint: str | None = Field(description="the API's configuration: new tasks go to workers that run it")
    workers: list[str] = Field(description="live workers (Celery nodes) that run the API's configuration")
    queues: dict[str, list[str]] = Field(description="each role's live workers of the API's configuration; ready "
                                         "needs predict and adapt")
    models: list[str]  # worker processes with the model loaded
    mismatched: list[Mismatch] = Field(description="live workers of another configuration: they are sent no task of "
                                       "this one (and tasks of theirs go to them alone)")
    checkpoint: CheckpointInfo | None = Field(None, description="null while Redis is unreachable")


NEEDED = ("predict", "adapt")  # meta-training is an admin's: its worker may be away


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up. Async: it answers on the event loop even when every thread is busy."""
    return Health(status="ok")


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready, "description": "not ready"}})
def readyz(request: Request, response: Response, s: SettingsDep, store: StoreDep) -> Ready:
    """Both Redis reachable, and live workers of the API's configuration that take predictions and
    adaptations (their heartbeats, within predict_dead_after_s). Workers of another configuration
    are listed with what differs."""
    def ok(fn) -> bool:
        try:
            return bool(fn())
        except Exception:
            return False

    state = request.app.state
    mine: str | None = state.fingerprint
    redis_ok = ok(store.r.ping)
    cache_ok = ok(state.cache.ping)
    live: dict[str, dict[str, Any]] = {}
    if redis_ok:
        try:
            live = store.live_workers(s.predict_dead_after_s)
        except Exception:
            live = {}
    queues: dict[str, set[str]] = {}
    nodes: set[str] = set()
    odd: dict[str, Mismatch] = {}
    for proc, info in live.items():
        node = info.get("node") or proc
        if info.get("fingerprint") != mine:
            odd[node] = Mismatch(worker=node, fingerprint=str(info.get("fingerprint")),
                                 differs=differences(state.config, info.get("config") or {}))
            continue
        nodes.add(node)
        for role in info.get("roles", ()):
            queues.setdefault(role, set()).add(node)
    models = sorted(f"{proc}: {info['model']} on {info['device']}" for proc, info in live.items()
                    if info.get("fingerprint") == mine)
    ready = redis_ok and cache_ok and all(queues.get(q) for q in NEEDED) and bool(models)
    checkpoint = None
    if redis_ok:
        try:
            shipped = store.shipped()
            checkpoint = CheckpointInfo(active=store.active_checkpoint(),
                                        shipped=Shipped.model_validate(shipped) if shipped else None)
        except Exception:
            checkpoint = None
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Ready(ready=ready, redis=redis_ok, cache=cache_ok, fingerprint=mine, workers=sorted(nodes),
                 queues={q: sorted(w) for q, w in queues.items()}, models=models,
                 mismatched=[odd[n] for n in sorted(odd)], checkpoint=checkpoint)
