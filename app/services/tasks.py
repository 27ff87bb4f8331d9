"""Tasks: create one (its recipe, checkpoint and limits resolved, its adaptation enqueued) or reuse
the identical one, or serve an adapter brought along. Plain functions the routes call."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from typing import Any

import anyio.from_thread
from celery import Celery
from fastapi import HTTPException, status
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from app.adaptations import enqueue, new_run, retry_failed, sender
from app.errors import invalid, invalid_from, public
from app.quotas import check_adapt_seconds, check_weights, too_many_tasks
from app.routing import Router
from app.schemas import Adaptation, TaskCreate
from app.services import checkpoints
from contract import demos
from contract.blobs import store_of
from contract.queues import IMPORT_ADAPTER
from contract.store import BASE, Store, content_hash, now, task_weights_key
from model.recipe import DEFAULT, Recipe
from model.settings import Settings
from model.task import Limits, Task, validate_task


def create(body: TaskCreate, who: str, s: Settings, store: Store, celery: Celery, fingerprint: str,
           count_tokens: Callable[[str], int], router: Router) -> tuple[dict[str, Any], bool]:
    """The task record for this request, and whether it is new: imported when the body brings an
    adapter, else created and enqueued, or the identical task reused."""
    if body.adapter is not None:
        return import_task(body, who, s, store, fingerprint, count_tokens, router)
    return create_or_reuse(body, who, s, store, celery, fingerprint, count_tokens)


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


def resolve_recipe(s, a: Adaptation, space: str, ckpt_lr: float | None) -> Recipe:
    """The task's recipe: the default, the operator's overrides, then the request's fields. In
    context (space none) nothing is trained and every demonstration that fits is shown."""
    recipe = DEFAULT.but(**s.adapt_recipe)
    if a.head is not None:
        recipe = recipe.but(head=a.head)
    if space == "none":
        return recipe.but(epochs=0, min_steps=0, predict_demos=None)
    lr = a.lr or ckpt_lr
    if lr is not None:
        recipe = recipe.but(lr=lr)
    if a.epochs is not None:  # asked for: trained whatever the number of demonstrations
        recipe = recipe.but(epochs=a.epochs, min_steps=min(recipe.min_steps, 1 if a.epochs else 0), min_demos=0)
    if a.steps is not None:
        recipe = recipe.but(epochs=1.0 if a.steps else 0.0, min_steps=a.steps, max_steps=a.steps, min_demos=0)
    return recipe


def checkpoint_lr(s, ckpt: str, space: str) -> float | None:
    """A meta-trained checkpoint adapts with its meta-training inner lr in its own space."""
    if ckpt == BASE:
        return None
    try:
        return checkpoints.inner_lr(checkpoints.meta(s, ckpt), space)
    except checkpoints.CheckpointError:  # the active one was deleted: the worker says so when it loads it
        return None


def too_many_demonstrations(n: int, limit: int) -> HTTPException:
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"{n} demonstrations; the limit is {limit} (max_demonstrations)")


def checked_task(body: TaskCreate, s: Settings, count_tokens: Callable[[str], int]) -> Task:
    data = body.model_dump(exclude={"adaptation", "checkpoint", "adapter"}, exclude_none=True)
    limits = Limits.of(s)
    if len(body.demonstrations) > limits.max_demonstrations:  # more than a task may hold: 413, before any token is counted
        raise too_many_demonstrations(len(body.demonstrations), limits.max_demonstrations)
    try:  # again, now with token counts: the body model could only count characters
        return validate_task(data, limits, count_tokens)
    except ValidationError as e:
        raise invalid_from(e, ("body",)) from e


def create_record(store: Store, s: Settings, task_id: str, who: str, spec: dict[str, Any], fields: dict[str, Any]
                  ) -> bool | None:
    """store.create_task with the spec's demonstrations kept apart (contract/demos.py): referenced
    before the record is written, and released unless a record with this id names them after."""
    kept, key, rows = demos.split(who, spec["task"])
    demos.hold(s, key, task_id, rows)
    created = None
    try:
        created = store.create_task(task_id, who, {**spec, **kept, **fields}, max_tasks=s.max_tasks)
    finally:
        if not created:  # over the count, an error, or the same task exists (its record may predate demos_key)
            rec = store.task(task_id)
            if rec is None or rec.get("demos_key") != key:
                demos.release(s, key, task_id)
    return created


def delete(rec: dict[str, Any], who: str, s: Settings, store: Store) -> None:
    """Remove the task record, then what only it held: its weights and its demonstrations' reference."""
    deleted = store.delete_task(rec["id"], who)
    key = task_weights_key(rec)
    store_of(s, key).delete(key)
    if deleted and rec.get("demos_key"):
        demos.release(s, rec["demos_key"], rec["id"])


def create_or_reuse(body: TaskCreate, who: str, s: Settings, store: Store, celery: Celery, fingerprint: str,
                    count_tokens: Callable[[str], int]) -> tuple[dict[str, Any], bool]:
    """The task record for this request, adapting it (enqueued) when it is new or failed; and whether it is new."""
    task = checked_task(body, s, count_tokens)
    a = body.adaptation
    space = a.space or s.adapt_mode
    ckpt = resolve_checkpoint(s, store, body.checkpoint)
    recipe = resolve_recipe(s, a, space, checkpoint_lr(s, ckpt, space))
    steps = recipe.steps_for(len(task.demonstrations))
    if steps > s.adapt_max_steps:
        if a.steps is not None:
            raise invalid(("body", "adaptation", "steps"), f"steps is {steps}; the limit is {s.adapt_max_steps}", "too_many_steps")
        raise invalid(("body", "adaptation", "epochs"), f"{recipe.epochs:g} epochs of {len(task.demonstrations)} demonstrations "
                      f"in batches of {recipe.batch_size} are {steps} steps; the limit is {s.adapt_max_steps}", "too_many_steps")
    epochs = recipe.epochs_for(len(task.demonstrations))
    # the record keeps the field's old name, `mode`: it is hashed into the task id, and stored tasks are found by it
    spec = {"task": task.model_dump(exclude_none=True), "mode": space, "recipe": recipe.to_dict(), "steps": steps,
            "epochs": epochs, "lr": recipe.lr_for("full" if space == "full" else "lora"), "seed": a.seed,
            "checkpoint": ckpt, "base_model": s.base_model, "prompt_format": s.prompt_format}
    spec["fingerprint"] = fp = fingerprint  # the configuration its weights belong to
    digest = content_hash(who, spec)
    task_id = digest[:32]
    existing = store.task(task_id)
    if space != "none" and (existing is None or existing["status"] == "failed"):  # a run to come stores weights
        check_weights(store, who, space, s.max_weights_bytes)
        check_adapt_seconds(store, who, s.max_adapt_seconds_per_hour)
    run = new_run()
    created = create_record(store, s, task_id, who, spec, {
        "hash": digest, "status": "ready" if space == "none" else "queued", "step": 0, "n_steps": steps,
        "attempts": 0, "completions": 0, "enqueued": space == "none", "run": run, "queued_at": now(),
        **({"adapt_seconds": 0.0} if space == "none" else {}),
    })
    if created is None:
        raise too_many_tasks(s.max_tasks)
    rec = store.task(task_id)
    # A new task is enqueued, and one that failed runs again; one its creator could not enqueue
    # (the broker was down, or the request died) is the reaper's.
    if space != "none" and (created or rec["status"] == "failed"):
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


def import_task(body: TaskCreate, who: str, s: Settings, store: Store, fingerprint: str,
                count_tokens: Callable[[str], int], router: Router) -> tuple[dict[str, Any], bool]:
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
    task = checked_task(body, s, count_tokens)
    recipe = resolve_recipe(s, Adaptation(steps=0), "lora", None)
    spec = {"task": task.model_dump(exclude_none=True), "mode": "lora", "recipe": recipe.to_dict(), "steps": 0,
            "epochs": 0.0, "lr": recipe.lr_for("lora"), "seed": 0, "checkpoint": BASE, "base_model": s.base_model,
            "prompt_format": s.prompt_format, "adapter_sha256": hashlib.sha256(raw).hexdigest(),
            "fingerprint": fingerprint}
    digest = content_hash(who, spec)
    task_id = digest[:32]
    existing = store.task(task_id)
    if existing is not None:
        return existing, False
    if store.count_tasks(who) >= s.max_tasks:
        raise too_many_tasks(s.max_tasks)
    check_weights(store, who, "lora", s.max_weights_bytes, more=len(raw))
    try:
        pointer = anyio.from_thread.run(router.call, spec["fingerprint"], IMPORT_ADAPTER,
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
    created = create_record(store, s, task_id, who, spec, {
        "hash": digest, "status": "ready", "imported": True, "step": 0, "n_steps": 0, "attempts": 0,
        "completions": 1, "enqueued": True, "run": new_run(), "queued_at": t, "started_at": t, "finished_at": t,
        "adapt_seconds": 0.0, **pointer,
    })
    if not created:  # over the count, or an identical import won the race (its record holds the same file)
        store.refund(who, "weights_bytes", size)
        if created is None:
            store_of(s, key).delete(key)
            raise too_many_tasks(s.max_tasks)
    return store.task(task_id), bool(created)
