"""Tasks: create (adaptation enqueued, or an adapter imported), status, list, events, delete, export."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio.from_thread
import anyio.to_thread
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from app import idempotency
from app.adaptations import enqueue, new_run, retry_failed, sender
from app.bodies import StrictRoute
from app.deps import CeleryDep, SettingsDep, StoreDep, TenantDep
from app.errors import ERRORS, invalid, invalid_from, public
from app.idempotency import IdempotencyKey
from app.quotas import check_adapt_seconds, check_weights, too_many_tasks
from app.schemas import Adaptation, Progress, Status, TaskCreate, TaskInfo, TaskPage, TaskUsage
from app.routing import task_fingerprint
from app.watcher import UNDERWAY
from model.recipe import DEFAULT, Recipe
from model.settings import Settings
from model.task import Limits, Task, validate_task
from worker import checkpoints
from worker.blobs import store_of
from worker.store import BASE, Store, content_hash, now, task_weights_key

router = APIRouter(prefix="/tasks", tags=["tasks"], route_class=StrictRoute)


def info(rec: dict[str, Any], request: Request) -> TaskInfo:
    return TaskInfo(
        id=rec["id"], status=rec["status"], status_url=str(request.url_for("get_task", task_id=rec["id"])),
        error=public(rec.get("error")), mode=rec["mode"], steps=rec["steps"], epochs=rec.get("epochs", 0.0), lr=rec["lr"],
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


def resolve_checkpoint(s, store, requested: str | None) -> str:
    if requested is None:
        return store.active_checkpoint()
    if requested == BASE:
        return BASE
    try:
        checkpoints.meta(s, requested)
    except checkpoints.CheckpointError as e:
        raise invalid(("body", "checkpoint"), public(str(e)), "unknown_checkpoint") from e
    return requested


def resolve_recipe(s, a: Adaptation, mode: str, ckpt_lr: float | None) -> Recipe:
    """The task's recipe: the default, the operator's overrides, then the request's fields. In
    context (mode none) nothing is trained and every demonstration that fits is shown."""
    recipe = DEFAULT.but(**s.adapt_recipe)
    if mode == "none":
        return recipe.but(epochs=0, min_steps=0, predict_demos=None)
    lr = a.lr or ckpt_lr
    if lr is not None:
        recipe = recipe.but(lr=lr)
    if a.epochs is not None:  # asked for: trained whatever the number of demonstrations
        recipe = recipe.but(epochs=a.epochs, min_steps=min(recipe.min_steps, 1 if a.epochs else 0), min_demos=0)
    if a.steps is not None:
        recipe = recipe.but(epochs=1.0 if a.steps else 0.0, min_steps=a.steps, max_steps=a.steps, min_demos=0)
    return recipe


def checkpoint_lr(s, ckpt: str, mode: str) -> float | None:
    """A meta-trained checkpoint adapts with its meta-training inner lr in its own space."""
    if ckpt == BASE:
        return None
    try:
        return checkpoints.inner_lr(checkpoints.meta(s, ckpt), mode)
    except checkpoints.CheckpointError:  # the active one was deleted: the worker says so when it loads it
        return None


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
        if body.adapter is not None:
            rec, created = import_task(body, request, who, s, store)
        else:
            rec, created = create_or_reuse(body, request, who, s, store, celery)
        location = str(request.url_for("get_task", task_id=rec["id"]))
        return (202 if created else 200), info(rec, request).model_dump(mode="json"), {"Location": location}

    code, out, headers = idempotency.once(store, f"tenant:{who}", idempotency_key, body.model_dump(mode="json"),
                                          s.idempotency_ttl_s, run)
    response.status_code = code
    response.headers.update(headers)
    return TaskInfo.model_validate(out)


def checked_task(body: TaskCreate, request: Request, s: Settings) -> Task:
    data = body.model_dump(exclude={"adaptation", "checkpoint", "adapter"}, exclude_none=True)
    limits = Limits.of(s)
    try:  # again, now with token counts: the body model could only count characters
        return validate_task(data, limits, request.app.state.count_tokens)
    except ValidationError as e:
        raise invalid_from(e, ("body",)) from e


def create_or_reuse(body: TaskCreate, request: Request, who: str, s: Settings, store: Store, celery) -> tuple[dict[str, Any], bool]:
    """The task record for this request, adapting it (enqueued) when it is new or failed; and whether it is new."""
    task = checked_task(body, request, s)
    a = body.adaptation
    mode = a.mode or s.adapt_mode
    ckpt = resolve_checkpoint(s, store, body.checkpoint)
    recipe = resolve_recipe(s, a, mode, checkpoint_lr(s, ckpt, mode))
    steps = recipe.steps_for(len(task.demonstrations))
    if steps > s.adapt_max_steps:
        if a.steps is not None:
            raise invalid(("body", "adaptation", "steps"), f"steps is {steps}; the limit is {s.adapt_max_steps}", "too_many_steps")
        raise invalid(("body", "adaptation", "epochs"), f"{recipe.epochs:g} epochs of {len(task.demonstrations)} demonstrations "
                      f"in batches of {recipe.batch_size} are {steps} steps; the limit is {s.adapt_max_steps}", "too_many_steps")
    epochs = recipe.epochs_for(len(task.demonstrations))
    spec = {"task": task.model_dump(exclude_none=True), "mode": mode, "recipe": recipe.to_dict(), "steps": steps,
            "epochs": epochs, "lr": recipe.lr_for("full" if mode == "full" else "lora"), "seed": a.seed,
            "checkpoint": ckpt, "base_model": s.base_model, "prompt_format": s.prompt_format}
    spec["fingerprint"] = fp = request.app.state.fingerprint  # the configuration its weights belong to
    digest = content_hash(who, spec)
    task_id = digest[:32]
    existing = store.task(task_id)
    if mode != "none" and (existing is None or existing["status"] == "failed"):  # a run to come stores weights
        check_weights(store, who, mode, s.max_weights_bytes)
        check_adapt_seconds(store, who, s.max_adapt_seconds_per_hour)
    run = new_run()
    created = store.create_task(task_id, who, {
        **spec, "hash": digest, "status": "ready" if mode == "none" else "queued", "step": 0, "n_steps": steps,
        "attempts": 0, "completions": 0, "enqueued": mode == "none", "run": run, "queued_at": now(),
        **({"adapt_seconds": 0.0} if mode == "none" else {}),
    }, max_tasks=s.max_tasks)
    if created is None:
        raise too_many_tasks(s.max_tasks)
    rec = store.task(task_id)
    # A new task is enqueued, and one that failed runs again; one its creator could not enqueue
    # (the broker was down, or the request died) is the reaper's.
    if mode != "none" and (created or rec["status"] == "failed"):
        send = sender(celery, fp)
        try:
            if created:
                enqueue(store, send, task_id, run, fp)
            else:
                retry_failed(store, send, rec)
        except OperationalError as e:  # the broker is down: the record stays, the reaper enqueues it
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the task queue is unavailable; it is enqueued "
                                "once the queue is back", headers={"Retry-After": "5"}) from e
        rec = store.task(task_id)
    return rec, created


def import_task(body: TaskCreate, request: Request, who: str, s: Settings, store: Store) -> tuple[dict[str, Any], bool]:
    """A task served with the adapter in the request, checked against the base by the worker (which
    also calibrates the options' prior with it and keeps it on disk); ready at once."""
    if body.adaptation.model_fields_set or body.checkpoint not in (None, BASE):
        field = "adaptation" if body.adaptation.model_fields_set else "checkpoint"
        raise invalid(("body", field), f"an imported adapter is served as it is, on the base model: leave {field} out",
                      "not_with_adapter")
    try:
        raw = base64.b64decode(body.adapter, validate=True)
    except (binascii.Error, ValueError) as e:
        raise invalid(("body", "adapter"), f"not base64: {e}", "adapter_not_base64") from e
    if len(raw) > s.max_adapter_bytes:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"the adapter zip has {len(raw)} bytes; the limit "
                            f"is {s.max_adapter_bytes} (max_adapter_bytes)")
    task = checked_task(body, request, s)
    recipe = resolve_recipe(s, Adaptation(steps=0), "lora", None)
    spec = {"task": task.model_dump(exclude_none=True), "mode": "lora", "recipe": recipe.to_dict(), "steps": 0,
            "epochs": 0.0, "lr": recipe.lr_for("lora"), "seed": 0, "checkpoint": BASE, "base_model": s.base_model,
            "prompt_format": s.prompt_format, "adapter_sha256": hashlib.sha256(raw).hexdigest(),
            "fingerprint": request.app.state.fingerprint}
    digest = content_hash(who, spec)
    task_id = digest[:32]
    existing = store.task(task_id)
    if existing is not None:
        return existing, False
    if store.count_tasks(who) >= s.max_tasks:
        raise too_many_tasks(s.max_tasks)
    check_weights(store, who, "lora", s.max_weights_bytes, more=len(raw))
    state = request.app.state
    try:
        pointer = anyio.from_thread.run(state.router.call, spec["fingerprint"], "worker.tasks.import_adapter",
                                        [{"id": task_id, "hash": digest, "tenant": who, **spec}, body.adapter,
                                         4 * s.max_adapter_bytes])
    except HTTPException as e:
        if e.status_code == 422:  # the worker's AdapterError: what does not fit this base
            raise invalid(("body", "adapter"), str(e.detail), "adapter_not_servable") from e
        raise
    size, key = pointer["weights_bytes"], pointer["weights_key"]
    if store.charge(who, "weights_bytes", size, s.max_weights_bytes) is None:
        store_of(s, key).delete(key)
        check_weights(store, who, "lora", s.max_weights_bytes, more=size)  # says why
    t = now()
    created = store.create_task(task_id, who, {
        **spec, "hash": digest, "status": "ready", "imported": True, "step": 0, "n_steps": 0, "attempts": 0,
        "completions": 1, "enqueued": True, "run": new_run(), "queued_at": t, "started_at": t, "finished_at": t,
        "adapt_seconds": 0.0, **pointer,
    }, max_tasks=s.max_tasks)
    if not created:  # over the count, or an identical import won the race (its record holds the same file)
        store.refund(who, "weights_bytes", size)
        if created is None:
            store_of(s, key).delete(key)
            raise too_many_tasks(s.max_tasks)
    return store.task(task_id), bool(created)


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
    parts = state.router.stream(task_fingerprint(rec, state.fingerprint), "worker.tasks.adapter", [task_id, format])
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
