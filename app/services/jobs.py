"""Meta-training jobs and the checkpoint registry (admin): start a job once its config and the bank
it needs are checked, cancel one, choose the checkpoint new tasks start from."""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery
from fastapi import HTTPException, status
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from app.adaptations import job_sender
from app.errors import invalid, invalid_from, public
from app.schemas import MetaTrainRequest
from app.services import checkpoints
from contract.blobs import shared
from contract.records import job_config
from contract.store import BASE, Store
from model.bank.catalog import load_bank, setting_names
from model.meta_config import MetaTrainConfig
from model.settings import Settings

# The service decides where checkpoints go, which model and device train, and how jobs are tagged.
SERVICE_OWNED = {"data_dir", "device", "base_model", "tag", "method", "space", "setting", "prompt_format", "lora_r", "lora_alpha",
                 "lora_targets", "lora_layers"}  # a checkpoint only loads on the model, prompt and LoRA layout it was made for


def hyperparameters_schema() -> dict[str, Any]:
    """The meta-training config's fields a request may set (closed: an unknown key is a 422)."""
    full = MetaTrainConfig.model_json_schema()
    return {"type": "object", "additionalProperties": False, "title": "Hyperparameters",
            "description": "overrides of the meta-training config (model.meta_train.MetaTrainConfig)",
            "properties": {k: v for k, v in full["properties"].items() if k not in SERVICE_OWNED}}


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


def start_job(body: MetaTrainRequest, s: Settings, store: Store, celery: Celery, fingerprint: str) -> dict[str, Any]:
    """The job's record once it is queued on the `meta` queue of this configuration's workers."""
    job_id = uuid.uuid4().hex
    for key in body.hyperparameters:
        if key in SERVICE_OWNED:
            raise invalid(("body", "hyperparameters", key), f"{key} is set by the service, not per job", "not_allowed")
    try:  # the config the worker will build, checked now rather than failing in the queue
        job_config({**body.model_dump(), "id": job_id}, s, strict=True)
    except ValidationError as e:
        raise invalid_from(e, ("body", "hyperparameters")) from e
    check_bank(s, body.setting)
    fp = fingerprint  # the workers of this configuration train it
    store.create_job(job_id, {**body.model_dump(), "state": "queued", "progress": {}, "metrics": {}, "cancel": False,
                              "fingerprint": fp})
    try:
        job_sender(celery, fp)(job_id, fp)
    except OperationalError as e:
        store.update_job(job_id, state="failed", error=f"could not enqueue: {e}")
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"the task queue is unavailable ({e}); retry") from e
    return store.job(job_id)


def cancel_job(store: Store, rec: dict[str, Any]) -> dict[str, Any]:
    """A queued job is cancelled at once; a running one stops at its next step (a checkpoint it saved stays)."""
    job_id = rec["id"]
    if rec["state"] == "queued":
        store.update_job(job_id, state="cancelled", cancel=True)
    elif rec["state"] == "running":
        store.update_job(job_id, cancel=True)
    else:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is already {rec['state']}")
    return store.job(job_id)


def activate_checkpoint(s: Settings, store: Store, ckpt_id: str) -> None:
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
