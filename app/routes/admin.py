"""Admin (admin key only): meta-training jobs and the checkpoint registry."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from app import idempotency
from app.adaptations import job_sender
from app.idempotency import IdempotencyKey
from app.bodies import StrictRoute
from app.deps import CeleryDep, SettingsDep, StoreDep, admin
from app.errors import ADMIN_ERRORS, invalid, invalid_from, public, public_values
from app.schemas import Checkpoint, Checkpoints, JobInfo, JobPage, JobState, MetaTrainRequest
from model.bank.store import load_bank, setting_names
from model.settings import Settings
from worker import checkpoints
from worker.blobs import shared
from worker.store import BASE, now
from worker.tasks import job_config

# The service decides where checkpoints go, which model and device train, and how jobs are tagged.
SERVICE_OWNED = {"data_dir", "device", "base_model", "tag", "method", "space", "setting", "prompt_format", "lora_r", "lora_alpha",
                 "lora_targets", "lora_layers"}  # a checkpoint only loads on the model, prompt and LoRA layout it was made for

def hyperparameters_schema() -> dict[str, Any]:
    """The meta-training config's fields a request may set (closed: an unknown key is a 422)."""
    from model.meta_train import MetaTrainConfig  # job_config's module: loaded with the worker glue already

    full = MetaTrainConfig.model_json_schema()
    return {"type": "object", "additionalProperties": False, "title": "Hyperparameters",
            "description": "overrides of the meta-training config (model.meta_train.MetaTrainConfig)",
            "properties": {k: v for k, v in full["properties"].items() if k not in SERVICE_OWNED}}


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin)], responses=ADMIN_ERRORS,
                   route_class=StrictRoute)


def job_info(rec: dict[str, Any], request: Request) -> JobInfo:
    started = rec.get("started_at")
    seconds = None if started is None else round((rec.get("finished_at") or now()) - started, 3)
    return JobInfo(**{k: v for k, v in rec.items() if k in JobInfo.model_fields and k not in ("error", "usage")},
                   error=public(rec.get("error")), status_url=str(request.url_for("get_job", job_id=rec["id"])),
                   usage={"seconds": seconds})


def get_job_or_404(store, job_id: str) -> dict[str, Any]:
    rec = store.job(job_id) if len(job_id) <= 64 else None
    if rec is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return rec


def check_bank(s: Settings, setting: str) -> None:
    """A task-bank setting needs the setting's tasks in the service's shared store, where every
    worker reads them: checked before a job exists, so a run never fails in the worker for want of
    them (409 naming the commands that put them there)."""
    if setting == "synthetic":
        return
    known = setting_names()
    if setting not in known:
        raise invalid(("body", "setting"), f"no setting {setting!r}; known: synthetic, {', '.join(known)}", "unknown_setting")
    how = (f"build the bank on any machine (`python -m model.bank build`), then put the setting's tasks in the "
           f"service's store with `python -m worker.shared bank {setting}` (with the service's MAMLSERVE_REDIS_URL)")
    try:
        bank = load_bank(shared(s))
    except FileNotFoundError:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the task bank is not in the service's store: {how}") from None
    st = bank.setting(setting)
    missing = [n for n in st.meta_train + st.held_out if n not in bank.manifest["tasks"]]
    if missing:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the task bank in the service's store lacks {len(missing)} of the "
                            f"tasks of setting {setting!r} (such as {missing[0]!r}): {how}")


@router.post("/meta-train", status_code=status.HTTP_202_ACCEPTED, response_model=JobInfo)
def meta_train(body: MetaTrainRequest, request: Request, response: Response, s: SettingsDep, store: StoreDep,
               celery: CeleryDep, idempotency_key: IdempotencyKey = None) -> JobInfo:
    """Start a meta-training run on the `meta` queue; it ends as a checkpoint in the registry.

    409 when the setting needs the task bank and this server has not built it, or when the
    Idempotency-Key was used with another body."""
    def run() -> idempotency.Answer:
        job = start_job(body, request, s, store, celery)
        return 202, job.model_dump(mode="json"), {"Location": job.status_url}

    code, out, headers = idempotency.once(store, "admin", idempotency_key, body.model_dump(mode="json"),
                                          s.idempotency_ttl_s, run)
    response.status_code = code
    response.headers.update(headers)
    return JobInfo.model_validate(out)


def start_job(body: MetaTrainRequest, request: Request, s: Settings, store, celery) -> JobInfo:
    job_id = uuid.uuid4().hex
    for key in body.hyperparameters:
        if key in SERVICE_OWNED:
            raise invalid(("body", "hyperparameters", key), f"{key} is set by the service, not per job", "not_allowed")
    try:  # the config the worker will build, checked now rather than failing in the queue
        job_config({**body.model_dump(), "id": job_id}, strict=True)
    except ValidationError as e:
        raise invalid_from(e, ("body", "hyperparameters")) from e
    check_bank(s, body.setting)
    fp = request.app.state.fingerprint  # the workers of this configuration train it
    store.create_job(job_id, {**body.model_dump(), "state": "queued", "progress": {}, "metrics": {}, "cancel": False,
                              "fingerprint": fp})
    try:
        job_sender(celery, fp)(job_id, fp)
    except OperationalError as e:
        store.update_job(job_id, state="failed", error=f"could not enqueue: {e}")
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"the task queue is unavailable ({e}); retry") from e
    return job_info(store.job(job_id), request)


@router.get("/jobs", response_model=JobPage)
def list_jobs(request: Request, store: StoreDep, offset: int = Query(0, ge=0, le=1_000_000),
              limit: int = Query(20, ge=1, le=100),
              state: list[JobState] | None = Query(None, description="only jobs in these states (repeat for several)")
              ) -> JobPage:
    """The meta-training jobs, newest first."""
    recs, total = store.list_jobs(offset, limit, set(state or ()))
    nxt = offset + limit if offset + limit < total else None
    return JobPage(items=[job_info(r, request) for r in recs], total=total, offset=offset, limit=limit, next_offset=nxt)


@router.get("/jobs/{job_id}", response_model=JobInfo)
def get_job(job_id: str, request: Request, store: StoreDep) -> JobInfo:
    return job_info(get_job_or_404(store, job_id), request)


@router.post("/jobs/{job_id}/cancel", response_model=JobInfo)
def cancel_job(job_id: str, request: Request, store: StoreDep) -> JobInfo:
    """A queued job is cancelled at once; a running one stops at its next step (a checkpoint it saved stays)."""
    rec = get_job_or_404(store, job_id)
    if rec["state"] == "queued":
        store.update_job(job_id, state="cancelled", cancel=True)
    elif rec["state"] == "running":
        store.update_job(job_id, cancel=True)
    else:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is already {rec['state']}")
    return job_info(store.job(job_id), request)


@router.get("/checkpoints", response_model=Checkpoints)
def list_checkpoints(s: SettingsDep, store: StoreDep) -> Checkpoints:
    active = store.active_checkpoint()
    items = [Checkpoint(**{**public_values(m), "active": m.get("id") == active}) for m in checkpoints.listing(s)]
    return Checkpoints(active=active, items=items)


@router.post("/checkpoints/{ckpt_id}/activate", response_model=Checkpoints)
def activate_checkpoint(ckpt_id: str, s: SettingsDep, store: StoreDep) -> Checkpoints:
    """New tasks start from this checkpoint unless they name one; `base` goes back to the base model."""
    if ckpt_id != BASE:
        try:
            meta = checkpoints.meta(s, ckpt_id)
        except checkpoints.CheckpointError as e:
            raise HTTPException(status.HTTP_404_NOT_FOUND, public(str(e))) from e
        trained_on = (meta.get("base_model") or {}).get("name")
        if trained_on != s.base_model:
            raise HTTPException(status.HTTP_409_CONFLICT,
                                f"checkpoint {ckpt_id} was trained on {trained_on!r}; this service runs {s.base_model!r}")
    store.set_active_checkpoint(ckpt_id)
    return list_checkpoints(s, store)
