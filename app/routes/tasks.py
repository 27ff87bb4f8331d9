"""Tasks: create (adaptation enqueued, or an adapter imported), status, list, events, delete, export."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from app import idempotency
from app.bodies import StrictRoute
from app.deps import CeleryDep, SettingsDep, StoreDep, TenantDep
from app.errors import ERRORS, public
from app.idempotency import IdempotencyKey
from app.routing import task_fingerprint
from app.schemas import Progress, Status, TaskCreate, TaskInfo, TaskPage, TaskUsage
from app.services import tasks as service
from app.watcher import UNDERWAY
from contract.blobs import store_of
from contract.queues import ADAPTER
from contract.store import task_weights_key

router = APIRouter(prefix="/tasks", tags=["tasks"], route_class=StrictRoute)


def info(rec: dict[str, Any], request: Request) -> TaskInfo:
    return TaskInfo(
        id=rec["id"], status=rec["status"], status_url=str(request.url_for("get_task", task_id=rec["id"])),
        error=public(rec.get("error")), space=rec["mode"], mode=rec["mode"], steps=rec["steps"], epochs=rec.get("epochs", 0.0), lr=rec["lr"],
        recipe=rec.get("recipe") or {}, checkpoint=rec["checkpoint"], imported=bool(rec.get("imported")),
        usage=TaskUsage(adapt_seconds=rec.get("adapt_seconds")),
        progress=Progress(step=rec.get("step", 0), steps=rec.get("n_steps", rec["steps"]), epoch=rec.get("epoch", 0.0),
                          epochs=rec.get("epochs", 0.0), loss=rec.get("loss"),
                          loss_before=rec.get("loss_before"), loss_after=rec.get("loss_after")),
        attempts=rec.get("attempts", 0), created_at=rec["created_at"], started_at=rec.get("started_at"),
        finished_at=rec.get("finished_at"),
    )


def owned(store, task_id: str, who: str) -> dict[str, Any]:
    """The caller's task; another tenant's task is as absent as a missing one (404)."""
    rec = store.task(task_id) if len(task_id) <= 64 else None
    if rec is None or rec["tenant"] != who:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"task {task_id} not found")
    return rec


@router.post(
    "", status_code=status.HTTP_202_ACCEPTED, response_model=TaskInfo,
    responses={200: {"model": TaskInfo, "description": "the same task already exists (or the same Idempotency-Key)"},
               **ERRORS},
)
def create_task(body: TaskCreate, request: Request, response: Response, who: TenantDep, s: SettingsDep,
                store: StoreDep, celery: CeleryDep, idempotency_key: IdempotencyKey = None) -> TaskInfo:
    """Learn a task from its demonstrations, or serve it with an adapter made elsewhere (`adapter`);
    poll the status URL, or follow GET /tasks/{id}/events, until it is ready."""
    def run() -> idempotency.Answer:
        state = request.app.state
        rec, created = service.create(body, who, s, store, celery, state.fingerprint, state.count_tokens, state.router)
        location = str(request.url_for("get_task", task_id=rec["id"]))
        return (202 if created else 200), info(rec, request).model_dump(mode="json"), {"Location": location}

    code, out, headers = idempotency.once(store, f"tenant:{who}", idempotency_key, body.model_dump(mode="json"),
                                          s.idempotency_ttl_s, run)
    response.status_code = code
    response.headers.update(headers)
    return TaskInfo.model_validate(out)


@router.get("", response_model=TaskPage, responses=ERRORS)
def list_tasks(request: Request, who: TenantDep, store: StoreDep,
               offset: int = Query(0, ge=0, le=1_000_000), limit: int = Query(20, ge=1, le=100),
               status: list[Status] | None = Query(None, description="only tasks in these statuses (repeat for several)")
               ) -> TaskPage:
    """The caller's tasks, newest first."""
    recs, total = store.list_tasks(who, offset, limit, set(status or ()))
    nxt = offset + limit if offset + limit < total else None
    return TaskPage(items=[info(r, request) for r in recs], total=total, offset=offset, limit=limit, next_offset=nxt)


@router.get("/{task_id}", response_model=TaskInfo, responses=ERRORS)
def get_task(task_id: str, request: Request, who: TenantDep, store: StoreDep) -> TaskInfo:
    return info(owned(store, task_id, who), request)


@router.delete("/{task_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS)
def delete_task(task_id: str, who: TenantDep, s: SettingsDep, store: StoreDep) -> Response:
    """Remove the task and its weights."""
    rec = owned(store, task_id, who)
    store.delete_task(task_id, who)
    key = task_weights_key(rec)
    store_of(s, key).delete(key)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{task_id}/adapter", response_class=Response, responses={
        200: {"content": {"application/zip": {}}, "description": "a PEFT adapter folder, or a Hugging Face model "
              "folder, zipped; X-Mamlserve-Export says which (lora or full)"}, **ERRORS},
)
async def get_adapter(task_id: str, request: Request, who: TenantDep, store: StoreDep,
                      format: Literal["auto", "lora", "full"] = "auto") -> Response:
    """Exactly what the task predicts with, zipped. `lora`: a PEFT adapter folder, which
    `PeftModel.from_pretrained(base, folder)` loads on the base model named in its
    adapter_config.json (a task adapted in LoRA mode, from the base or from a checkpoint
    meta-trained in the LoRA space, whose initialisation the adapted LoRA already includes).
    `full`: a Hugging Face model folder that `AutoModelForCausalLM.from_pretrained` loads on its
    own (full-mode tasks; tasks on a checkpoint meta-trained in the full space; any LoRA merged
    in). `auto` (default): the LoRA when one holds it all. Either way `mamlserve.json` in the
    zip names the base (Hugging Face id, sha256 of its weights) and what predictions add to the
    weights: the prompt format, the recipe and the options' calibrated prior. 409 (saying why)
    when the task has no weights of its own, or a LoRA cannot hold them."""
    rec = await anyio.to_thread.run_sync(owned, store, task_id, who)
    if rec["status"] != "ready":
        raise HTTPException(status.HTTP_409_CONFLICT, f"task {task_id} is {rec['status']}, not ready")
    state = request.app.state
    parts = state.router.stream(task_fingerprint(rec, state.fingerprint), ADAPTER, [task_id, format])
    head = await anext(parts)  # {kind, size}, or the worker's refusal raised here, before the response starts

    async def body() -> AsyncIterator[bytes]:
        try:
            async for msg in parts:
                if "chunk" in msg:
                    yield base64.b64decode(msg["chunk"])
        finally:  # the client went away: the worker stops sending
            await parts.aclose()

    return StreamingResponse(body(), media_type="application/zip", headers={
        "Content-Disposition": f'attachment; filename="{task_id}-{head["kind"]}.zip"',
        "Content-Length": str(head["size"]), "X-Mamlserve-Export": head["kind"]})


@router.get("/{task_id}/events", response_class=StreamingResponse, responses={
    200: {"content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["event", "data"],
        "properties": {"event": {"enum": ["status", "deleted"]}, "data": {"type": "string", "description": "the task as JSON"}}}}},
          "description": "`event: status` with the task (as GET /tasks/{id}) whenever its status or progress changes"},
    **ERRORS})
async def task_events(task_id: str, request: Request, who: TenantDep, s: SettingsDep, store: StoreDep,
                      timeout_s: float = Query(300, gt=0, le=3600, description="end the stream after this long")
                      ) -> StreamingResponse:
    """The task's status and progress as server-sent events, from now until it is ready or failed
    (the last event), it is deleted (`event: deleted`), or timeout_s passes. A comment line every
    15 s keeps proxies from closing a quiet stream."""
    rec = await anyio.to_thread.run_sync(owned, store, task_id, who)
    quotas = request.app.state.quotas
    slot = quotas.slot(who, "events", s.max_event_streams, timeout_s + 60, "event streams", "max_event_streams")
    await slot.__aenter__()  # 429 here, before the stream starts; given back when it ends

    async def events() -> AsyncIterator[bytes]:
        try:
            seen, deadline, quiet = None, asyncio.get_running_loop().time() + timeout_s, 0.0
            current: dict[str, Any] | None = rec
            while True:
                if current is None:
                    yield f"event: deleted\ndata: {json.dumps({'id': task_id})}\n\n".encode()
                    return
                data = info(current, request).model_dump_json()
                if data != seen:
                    yield f"event: status\ndata: {data}\n\n".encode()
                    seen, quiet = data, 0.0
                if current["status"] not in UNDERWAY or asyncio.get_running_loop().time() > deadline:
                    return
                await asyncio.sleep(0.25)
                quiet += 0.25
                if quiet >= 15:
                    yield b": keep-alive\n\n"
                    quiet = 0.0
                current = await anyio.to_thread.run_sync(store.task, task_id)
        finally:
            await slot.__aexit__(None, None, None)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
