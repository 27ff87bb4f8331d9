"""The task and job records in the records Redis (contract/store.py keeps them), field by field as
the API writes them and the worker reads and updates them; and the config a job runs with."""

from __future__ import annotations

import json
from typing import Any, Literal, TypedDict

from model.meta_config import MetaTrainConfig
from model.settings import Settings

TaskStatus = Literal["queued", "adapting", "ready", "failed"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class TaskRecord(TypedDict, total=False):
    """A task: written whole by the API when it is created, then updated by the run that holds it."""

    id: str  # the first 32 hex digits of `hash`
    tenant: str
    hash: str  # content_hash(tenant, the fields below up to fingerprint): the same request finds the same task
    task: dict[str, Any]  # model.task.Task as JSON: options, instruction (and the demonstrations in records before demos_key)
    demos_key: str  # the demonstrations' blob in the durable store (contract/demos.py); contract.demos.task_json reads them
    n_demos: int
    mode: Literal["lora", "full", "none"]  # the parameter space adapted (the API's `space`); none: in context
    recipe: dict[str, Any]  # model.recipe.Recipe.to_dict()
    steps: int
    epochs: float
    lr: float
    seed: int
    checkpoint: str  # where adaptation starts: a checkpoint id or BASE
    base_model: str
    prompt_format: str
    fingerprint: str  # the configuration its weights belong to (contract/config.py): its workers take it
    status: TaskStatus
    run: str  # the run that may write; a superseded run writes nothing
    worker: str | None  # the process that claimed the run (host:pid), whose heartbeat the reaper watches
    enqueued: bool  # false until a message is on the adapt queue (the reaper enqueues after enqueue_grace_s)
    attempts: int  # runs claimed
    completions: int  # runs finished
    created_at: float
    queued_at: float
    started_at: float
    finished_at: float
    step: int  # progress: step i of n_steps, epoch, the last loss
    n_steps: int
    epoch: float
    loss: float
    eta_s: float | None  # while adapting: seconds left for the training steps (worker/tasks.py)
    stopped: str | None  # why training ended before n_steps ("time_budget"; step says how many ran)
    loss_before: float  # support loss before and after adaptation
    loss_after: float
    error: str | None
    adapt_seconds: float  # worker seconds the run took (0 in context or imported)
    weights_key: str  # imported adapters: their blob key (adapted weights' key is derived: task_weights_key)
    weights_bytes: int  # what the tenant is charged for the weights
    imported: bool  # served with an adapter brought to POST /tasks
    adapter_sha256: str


class JobRecord(TypedDict, total=False):
    """A meta-training job: written by the API, run (and continued after a crash) by any worker."""

    id: str
    setting: str
    method: str
    space: Literal["lora", "full"]
    hyperparameters: dict[str, Any]  # MetaTrainConfig fields a request may set
    fingerprint: str
    state: JobState
    cancel: bool
    worker: str | None
    progress: dict[str, Any]  # {step, steps}
    metrics: dict[str, Any]
    checkpoint: str | None  # what the run ended as
    error: str | None
    created_at: float
    started_at: float
    finished_at: float


def job_config(job: JobRecord | dict[str, Any], s: Settings, strict: bool = False) -> MetaTrainConfig:
    """The run's MetaTrainConfig; tagged with the job so a redelivered job can find its checkpoint.
    strict: validated as the request's JSON is, where true is not 1 (the API checks requests so)."""
    steps = job["hyperparameters"].get("steps")
    steps = steps if isinstance(steps, int) else MetaTrainConfig.model_fields["steps"].default  # bad ones: the config says why
    hp = {"save_every": max(1, steps // 10), **job["hyperparameters"]}  # a lost worker costs <= 10% of the run
    fields = {**hp, "method": job["method"], "space": job["space"], "setting": job["setting"], "tag": f"job:{job['id']}"}
    if strict:
        return MetaTrainConfig.model_validate_json(json.dumps(fields), strict=True)
    return MetaTrainConfig.of(s, **fields)
