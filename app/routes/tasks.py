"""Tasks: create (adaptation enqueued, or an adapter imported), status, list, events, delete, export."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.routing import Match

from app import idempotency
from app import uploads
from app.bodies import StrictRoute, loads
from app.deps import CeleryDep, SettingsDep, StoreDep, TenantDep
from app.errors import ERRORS, invalid, public
from app.idempotency import IdempotencyKey
from app.routing import task_fingerprint
from app.schemas import Progress, Status, TaskCreate, TaskInfo, TaskPage, TaskUsage
from app.services import tasks as service
from app.watcher import UNDERWAY
from contract.queues import ADAPTER
from model.task import Limits

router = APIRouter(prefix="/tasks", tags=["tasks"], route_class=StrictRoute)


def info(rec: dict[str, Any], request: Request) -> TaskInfo:
    return TaskInfo(
        id=rec["id"], status=rec["status"], status_url=str(request.url_for("get_task", task_id=rec["id"])),
        error=public(rec.get("error")), space=rec["mode"], mode=rec["mode"], steps=rec["steps"], epochs=rec.get("epochs", 0.0), lr=rec["lr"],
        recipe=rec.get("recipe") or {}, checkpoint=rec["checkpoint"], imported=bool(rec.get("imported")),
        usage=TaskUsage(adapt_seconds=rec.get("adapt_seconds")),
        progress=Progress(step=rec.get("step", 0), steps=rec.get("n_steps", rec["steps"]), epoch=rec.get("epoch", 0.0),
                          epochs=rec.get("epochs", 0.0), loss=rec.get("loss"),
                          loss_before=rec.get("loss_before"), loss_after=rec.get("loss_after"),
                          eta_s=rec.get("eta_s") if rec["status"] == "adapting" else None, stopped=rec.get("stopped")),
        attempts=rec.get("attempts", 0), created_at=rec["created_at"], started_at=rec.get("started_at"),
        finished_at=rec.get("finished_at"),
    )


def owned(store, task_id: str, who: str) -> dict[str, Any]:
    """The caller's task; another tenant's task is as absent as a missing one (404)."""
    rec = store.task(task_id) if len(task_id) <= 64 else None
    if rec is None or rec["tenant"] != who:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"task {task_id} not found")
    return rec


def _create(body: TaskCreate, request: Request, response: Response, who: str, s, store, celery,
            idempotency_key: str | None) -> TaskInfo:
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


class UploadRoute(StrictRoute):
    """POST /tasks with an upload's content type (app/uploads.py); the JSON route takes every other body."""

    def matches(self, scope):
        match, child = super().matches(scope)
        return (match, child) if match is Match.NONE or uploads.is_upload(scope) else (Match.NONE, {})


async def create_task_upload(
    request: Request, response: Response, who: TenantDep, s: SettingsDep, store: StoreDep, celery: CeleryDep,
    idempotency_key: IdempotencyKey = None,
    options: list[str] | None = Query(None, description="the label set (repeat the parameter for each option)"),
    instruction: str | None = None, space: Literal["lora", "full", "none"] | None = None,
    steps: int | None = None, epochs: float | None = None, lr: float | None = None, seed: int | None = None,
    checkpoint: str | None = None,
) -> TaskInfo:
    """A task whose demonstrations come as a JSONL or CSV body (its other fields as query
    parameters) or a multipart form (a `demonstrations` file and a `task` JSON field)."""
    kind = uploads.media_type(request.headers.get("content-type"))
    data = await request.body()
    if len(data) > s.max_upload_bytes:  # BodyLimit let through up to the JSON body's limit with an adapter
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"request body exceeds {s.max_upload_bytes} bytes "
                            "(max_upload_bytes)")
    adaptation = {k: v for k, v in {"space": space, "steps": steps, "epochs": epochs, "lr": lr, "seed": seed}.items()
                  if v is not None}
    query = {k: v for k, v in {"options": options, "instruction": instruction, "checkpoint": checkpoint}.items()
             if v is not None} | ({"adaptation": adaptation} if adaptation else {})
    where: tuple = ("query",)
    if kind == uploads.MULTIPART:
        if query:
            raise invalid(("query", next(iter(request.query_params))), "a multipart upload gives the task's other "
                          "fields in its `task` field (JSON), not as query parameters", "not_with_multipart")
        data, file_kind, fields = await _form(request)
        where = ("body", "task")
    else:
        file_kind, fields = uploads.kind_of(kind), query
    limits, count = Limits.of(s), request.app.state.count_tokens
    await anyio.to_thread.run_sync(_check_fields, fields, where, limits, count)  # the options, before rows are held to them
    demos = await anyio.to_thread.run_sync(uploads.demonstrations, data, file_kind, fields.get("options"), limits, count)
    body = TaskCreate.model_validate({**fields, "demonstrations": demos})
    return await anyio.to_thread.run_sync(_create, body, request, response, who, s, store, celery, idempotency_key)


def _check_fields(fields: dict[str, Any], where: tuple, limits: Limits, count_tokens) -> None:
    """422 for the upload's other fields (named as the caller gave them: a query parameter, or a key
    of the form's `task` field), checked alone: the rows come next."""
    try:
        TaskCreate.model_validate({**fields, "demonstrations": []}, context={"limits": limits, "count_tokens": count_tokens})
    except ValidationError as e:
        errors = [{**err, "loc": where + (err["loc"][1:] if where == ("query",) and err["loc"][0] == "adaptation"
                                          else err["loc"])}
                  for err in e.errors(include_url=False) if err["loc"][:1] != ("demonstrations",)]
        if errors:
            raise RequestValidationError(errors) from e


async def _form(request: Request) -> tuple[bytes, str, dict[str, Any]]:
    """A multipart upload's file (its bytes and kind) and its `task` field (the task's other fields)."""
    form = await request.form(max_files=1, max_fields=1)  # Starlette answers 400 for a malformed form or one over these
    try:
        unknown = [k for k in form if k not in ("demonstrations", "task")]
        if unknown:
            raise invalid(("body", unknown[0]), f"a multipart upload has a file `demonstrations` and optionally a "
                          f"JSON field `task`, not {unknown[0]!r}", "unknown_field")
        file, task = form.get("demonstrations"), form.get("task", "{}")
        if not isinstance(file, UploadFile):
            raise invalid(("body", "demonstrations"), "a multipart upload has a file `demonstrations` (.csv or .jsonl)",
                          "missing")
        kind = uploads.kind_of(file.content_type, file.filename)
        if kind is None:
            raise invalid(("body", "demonstrations"), "the file is CSV (text/csv, .csv) or JSONL (application/jsonl, "
                          ".jsonl)", "unknown_file_type")
        try:
            fields = loads(task.encode()) if isinstance(task, str) else None
        except ValueError as e:
            raise invalid(("body", "task"), f"not JSON: {e}", "json_invalid") from e
        if not isinstance(fields, dict) or "demonstrations" in fields or "adapter" in fields:
            raise invalid(("body", "task"), "a JSON object with the task's other fields (options, instruction, "
                          "adaptation, checkpoint); the demonstrations are the file, and an adapter comes in a JSON "
                          "body", "bad_task_field")
        return await file.read(), kind, fields
    finally:
        await form.close()


router.add_api_route("", create_task_upload, methods=["POST"], route_class_override=UploadRoute,
                     include_in_schema=False, status_code=status.HTTP_202_ACCEPTED, response_model=TaskInfo)


@router.post(
    "", status_code=status.HTTP_202_ACCEPTED, response_model=TaskInfo,
    responses={200: {"model": TaskInfo, "description": "the same task already exists (or the same Idempotency-Key)"},
               **ERRORS},
)
def create_task(body: TaskCreate, request: Request, response: Response, who: TenantDep, s: SettingsDep,
                store: StoreDep, celery: CeleryDep, idempotency_key: IdempotencyKey = None) -> TaskInfo:
    """Learn a task from its demonstrations, or serve it with an adapter made elsewhere (`adapter`);
    poll the status URL, or follow GET /tasks/{id}/events, until it is ready. At most
    max_demonstrations (413 beyond). The demonstrations may also come as an upload: a JSONL
    (`application/jsonl`) or CSV (`text/csv`, header `input,output[,options]`) body with the other
    fields as query parameters (`options` repeated, `instruction`, `space`, `steps`, `epochs`, `lr`,
    `seed`, `checkpoint`), or `multipart/form-data` with a file `demonstrations` and a JSON field
    `task`; a bad row is a 422 naming its line."""
    return _create(body, request, response, who, s, store, celery, idempotency_key)


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
    service.delete(owned(store, task_id, who), who, s, store)
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
