"""Tasks: create (adaptation enqueued), status, list, delete, export the adapter."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from app.adaptations import enqueue, new_run, retry_failed, sender
from app.bodies import StrictRoute
from app.deps import CeleryDep, SettingsDep, StoreDep, TenantDep
from app.errors import ERRORS, invalid, invalid_from, public
from app.quotas import check_weights
from app.schemas import Adaptation, Progress, TaskCreate, TaskInfo, TaskPage
from app.worker_calls import call_worker
from model.recipe import DEFAULT, Recipe
from model.task import Limits, validate_task
from worker import checkpoints
from worker.store import BASE, content_hash, now, weights_key

router = APIRouter(prefix="/tasks", tags=["tasks"], route_class=StrictRoute)


def info(rec: dict[str, Any], request: Request) -> TaskInfo:
    return TaskInfo(
        id=rec["id"], status=rec["status"], status_url=str(request.url_for("get_task", task_id=rec["id"])),
        error=public(rec.get("error")), mode=rec["mode"], steps=rec["steps"], epochs=rec.get("epochs", 0.0), lr=rec["lr"],
        recipe=rec.get("recipe") or {}, checkpoint=rec["checkpoint"],
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
    if a.epochs is not None:
        recipe = recipe.but(epochs=a.epochs, min_steps=min(recipe.min_steps, 1 if a.epochs else 0))
    if a.steps is not None:
        recipe = recipe.but(epochs=1.0 if a.steps else 0.0, min_steps=a.steps, max_steps=a.steps)
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
    responses={200: {"model": TaskInfo, "description": "the same task already exists"}, **ERRORS},
)
def create_task(body: TaskCreate, request: Request, response: Response, who: TenantDep, s: SettingsDep,
                store: StoreDep, celery: CeleryDep) -> TaskInfo:
    """Learn a task from its demonstrations; poll the status URL until it is ready."""
    data = body.model_dump(exclude={"adaptation", "checkpoint"}, exclude_none=True)
    limits = Limits(s.max_demonstrations, s.max_options, s.max_text_tokens, s.max_text_chars)
    try:  # again, now with token counts: the body model could only count characters
        task = validate_task(data, limits, request.app.state.count_tokens)
    except ValidationError as e:
        raise invalid_from(e, ("body",)) from e
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
    epochs = steps * min(recipe.batch_size, len(task.demonstrations)) / len(task.demonstrations)
    spec = {"task": task.model_dump(exclude_none=True), "mode": mode, "recipe": recipe.to_dict(), "steps": steps,
            "epochs": epochs, "lr": recipe.lr_for("full" if mode == "full" else "lora"), "seed": a.seed,
            "checkpoint": ckpt, "base_model": s.base_model, "prompt_format": s.prompt_format}
    digest = content_hash(who, spec)
    task_id = digest[:32]
    existing = store.task(task_id)
    if mode != "none" and (existing is None or existing["status"] == "failed"):  # a run to come stores weights
        check_weights(store, who, mode, s.max_weights_bytes)
    run = new_run()
    created = store.create_task(task_id, who, {
        **spec, "hash": digest, "status": "ready" if mode == "none" else "queued", "step": 0, "n_steps": steps,
        "attempts": 0, "completions": 0, "enqueued": mode == "none", "run": run, "queued_at": now(),
    })
    rec = store.task(task_id)
    # A new task is enqueued, and one that failed runs again; one its creator could not enqueue
    # (the broker was down, or the request died) is the reaper's.
    if mode != "none" and (created or rec["status"] == "failed"):
        send = sender(celery)
        try:
            if created:
                enqueue(store, send, task_id, run)
            else:
                retry_failed(store, send, rec)
        except OperationalError as e:  # the broker is down: the record stays, the reaper enqueues it
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the task queue is unavailable; it is enqueued "
                                "once the queue is back", headers={"Retry-After": "5"}) from e
        rec = store.task(task_id)
    if not created:
        response.status_code = status.HTTP_200_OK
    response.headers["Location"] = str(request.url_for("get_task", task_id=task_id))
    return info(rec, request)


@router.get("", response_model=TaskPage, responses=ERRORS)
def list_tasks(request: Request, who: TenantDep, store: StoreDep,
               offset: int = Query(0, ge=0, le=1_000_000), limit: int = Query(20, ge=1, le=100)) -> TaskPage:
    """The caller's tasks, newest first."""
    recs, total = store.list_tasks(who, offset, limit)
    nxt = offset + limit if offset + limit < total else None
    return TaskPage(items=[info(r, request) for r in recs], total=total, offset=offset, limit=limit, next_offset=nxt)


@router.get("/{task_id}", response_model=TaskInfo, responses=ERRORS)
def get_task(task_id: str, request: Request, who: TenantDep, store: StoreDep) -> TaskInfo:
    return info(owned(store, task_id, who), request)


@router.delete("/{task_id}", status_code=status.HTTP_204_NO_CONTENT, responses=ERRORS)
def delete_task(task_id: str, request: Request, who: TenantDep, store: StoreDep) -> Response:
    """Remove the task and its cached weights."""
    rec = owned(store, task_id, who)
    store.delete_task(task_id, who)
    request.app.state.cache.delete(weights_key(rec["checkpoint"], rec["hash"]))
    if rec.get("weights_path"):
        Path(rec["weights_path"]).unlink(missing_ok=True)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{task_id}/adapter", response_class=Response, responses={
        200: {"content": {"application/zip": {}}, "description": "a PEFT adapter folder, zipped"}, **ERRORS},
)
async def get_adapter(task_id: str, request: Request, who: TenantDep, s: SettingsDep, store: StoreDep,
                      celery: CeleryDep) -> Response:
    """The task's adapted LoRA as a zip that `PeftModel.from_pretrained` loads once unzipped."""
    rec = await anyio.to_thread.run_sync(owned, store, task_id, who)
    if rec["mode"] == "full":
        raise HTTPException(status.HTTP_409_CONFLICT, "this task was adapted in full mode: it has no LoRA adapter")
    if rec["mode"] == "none" and rec["checkpoint"] == BASE:
        raise HTTPException(status.HTTP_409_CONFLICT, "this task runs in context on the base model: it has no adapter")
    if rec["status"] != "ready":
        raise HTTPException(status.HTTP_409_CONFLICT, f"task {task_id} is {rec['status']}, not ready")
    reply = await call_worker(celery, request.app.state.replies, s.predict_timeout_s, "worker.tasks.adapter", [task_id])
    data = base64.b64decode(reply["zip_b64"])
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{task_id}-adapter.zip"'})
