"""Admin (admin key only): meta-training jobs and the checkpoint registry."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status

from app import idempotency
from app.bodies import StrictRoute
from app.deps import CeleryDep, SettingsDep, StoreDep, admin
from app.errors import ADMIN_ERRORS, public, public_values
from app.idempotency import IdempotencyKey
from app.schemas import Checkpoint, Checkpoints, JobInfo, JobPage, JobState, MetaTrainRequest
from app.services import checkpoints, jobs
from contract.store import now

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


@router.post("/meta-train", status_code=status.HTTP_202_ACCEPTED, response_model=JobInfo)
def meta_train(body: MetaTrainRequest, request: Request, response: Response, s: SettingsDep, store: StoreDep,
               celery: CeleryDep, idempotency_key: IdempotencyKey = None) -> JobInfo:
    """Start a meta-training run on the `meta` queue; it ends as a checkpoint in the registry.

    409 when the setting needs the task bank and this server has not built it, or when the
    Idempotency-Key was used with another body."""
    def run() -> idempotency.Answer:
        job = job_info(jobs.start_job(body, s, store, celery, request.app.state.fingerprint), request)
        return 202, job.model_dump(mode="json"), {"Location": job.status_url}

    code, out, headers = idempotency.once(store, "admin", idempotency_key, body.model_dump(mode="json"),
                                          s.idempotency_ttl_s, run)
    response.status_code = code
    response.headers.update(headers)
    return JobInfo.model_validate(out)


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
    return job_info(jobs.cancel_job(store, get_job_or_404(store, job_id)), request)


@router.get("/checkpoints", response_model=Checkpoints)
def list_checkpoints(s: SettingsDep, store: StoreDep) -> Checkpoints:
    active = store.active_checkpoint()
    items = [Checkpoint(**{**public_values(m), "active": m.get("id") == active}) for m in checkpoints.listing(s)]
    return Checkpoints(active=active, items=items)


@router.post("/checkpoints/{ckpt_id}/activate", response_model=Checkpoints)
def activate_checkpoint(ckpt_id: str, s: SettingsDep, store: StoreDep) -> Checkpoints:
    """New tasks start from this checkpoint unless they name one; `base` goes back to the base model."""
    jobs.activate_checkpoint(s, store, ckpt_id)
    return list_checkpoints(s, store)
