"""Celery tasks: glue between the records in Redis and model/.

Every task is idempotent: `adapt` delivered twice (a worker died after finishing, or during)
checks the record first and ends with the task ready once; `predict`/`adapter` answer on a
reply list the API waits on with BLPOP, so their results never need the result backend.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import socket
import threading
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown

from model.prompts import PromptTooLong
from model.settings import get_settings
from model.task import Query
from worker.celery_app import app
from worker.checkpoints import CheckpointError
from worker.runtime import Runtime
from worker.store import REPLY, Store, now

log = logging.getLogger(__name__)
S = get_settings()
HEARTBEAT_S = 10

_runtime: Runtime | None = None
_stop = threading.Event()


def runtime() -> Runtime:
    """The process's model, loaded on first use (the solo pool sends no worker_process_init)."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(get_settings())
        threading.Thread(target=_heartbeat, args=(_runtime,), daemon=True).start()
    return _runtime


def _heartbeat(rt: Runtime) -> None:
    """Tell /readyz that a process with the model loaded is alive."""
    me = f"{socket.gethostname()}:{os.getpid()}"
    info = {"model": rt.lm.name, "sha256": rt.lm.sha256, "device": str(rt.lm.device)}
    while not _stop.is_set():
        try:
            rt.store.beat(me, info)
        except Exception:  # Redis away for a moment: the next beat tries again
            log.warning("heartbeat failed", exc_info=True)
        _stop.wait(HEARTBEAT_S)
    rt.store.gone(me)


@worker_process_init.connect
def _load_model(**_: Any) -> None:
    # In the pool child, never the parent: CUDA must not be initialised before the fork.
    runtime()


@worker_process_shutdown.connect
def _unload(**_: Any) -> None:
    _stop.set()


class Gone(Exception):
    """The task record was deleted while the worker was on it."""


def soft_limit(hard: int) -> int:
    # The soft limit lands between two steps (a step of a big model can take a while) and marks
    # the record failed; the hard limit's kill would leave it "adapting".
    return max(1, hard - max(30, hard // 10))


@app.task(name="worker.tasks.adapt", bind=True, time_limit=S.adapt_time_limit_s, soft_time_limit=soft_limit(S.adapt_time_limit_s))
def adapt(self, task_id: str) -> str:
    rt = runtime()
    st = rt.store
    rec = st.task(task_id)
    if rec is None:
        return "deleted"
    if rec["status"] == "ready" and rt.load_weights(rec) is not None:
        return "ready"  # a redelivery after the work was done
    st.update_task(task_id, status="adapting", started_at=now(), step=0, epoch=0.0, n_steps=rec["steps"], error=None)
    st.incr_task(task_id, "attempts")

    per_step = rec.get("epochs", 0.0) / max(rec["steps"], 1)  # epochs are steps x batch / demonstrations

    def on_step(i: int, n: int, loss: float) -> None:
        if not st.update_task(task_id, step=i, n_steps=n, epoch=round(i * per_step, 3), loss=loss):
            raise Gone(task_id)

    t0 = time.monotonic()
    try:
        result = rt.run_adaptation(rec, on_step)
        pointer = rt.store_weights(rec, result)
    except Gone:
        return "deleted"
    except SoftTimeLimitExceeded:
        st.update_task(task_id, status="failed", finished_at=now(), error=f"adaptation took longer than {soft_limit(S.adapt_time_limit_s)} s")
        return "failed"
    except (PromptTooLong, CheckpointError, ValueError) as e:
        st.update_task(task_id, status="failed", finished_at=now(), error=str(e))
        return "failed"
    except Exception as e:  # an unexpected error: the record says what, the log has the traceback
        log.exception("adaptation of %s failed", task_id)
        st.update_task(task_id, status="failed", finished_at=now(), error=f"{type(e).__name__}: {e}")
        return "failed"
    st.observe_adaptation(time.monotonic() - t0)
    done = st.finish_task(task_id, finished_at=now(), loss_before=result.loss_before, loss_after=result.loss_after,
                          **pointer)
    if not done:  # deleted while adapting: do not leave its weights behind
        rt.drop_weights(rec)
        return "deleted"
    return "ready"


def _reply(st: Store, key: str, body: dict[str, Any]) -> None:
    st.r.pipeline().rpush(key, json.dumps(body)).expire(key, 120).execute()


def _answer(reply: str, task_id: str, fn) -> None:
    """Run fn(runtime, record) and push its result, or the error as a status and message, to the reply list."""
    rt = runtime()
    key = REPLY + reply
    rec = rt.store.task(task_id)
    if rec is None:
        return _reply(rt.store, key, {"status": 404, "error": f"task {task_id} not found"})
    _reply(rt.store, key, _safely(lambda: fn(rt, rec), task_id))


def _safely(fn, task_id: str) -> dict[str, Any]:
    """fn()'s answer, or its error as the status and message the API returns."""
    try:
        return fn()
    except (PromptTooLong, CheckpointError, ValueError) as e:
        return {"status": 422, "error": str(e)}
    except Exception as e:
        log.exception("request on %s failed", task_id)
        return {"status": 500, "error": f"{type(e).__name__}: {e}"}


# acks_late off: a lost prediction is retried by its caller, not replayed an hour later.
@app.task(name="worker.tasks.predict", acks_late=False, ignore_result=True)
def predict(task_id: str, groups: list[list[dict[str, Any]]], reply: str) -> None:
    """Answer several callers' queries on one task in one batch; each group gets its own reply."""

    def answer(rt: Runtime, rec: dict[str, Any], group: list[dict[str, Any]]) -> dict[str, Any]:
        preds = rt.predict(rec, [Query.model_validate(q) for q in group])
        return {"predictions": [{"output": p.output, "scores": p.scores} for p in preds]}

    def run(rt: Runtime, rec: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            merged = answer(rt, rec, [q for g in groups for q in g])["predictions"]
            out, i = [], 0
            for g in groups:
                out.append({"predictions": merged[i: i + len(g)]})
                i += len(g)
        except Exception:  # one caller's input broke the batch: answer each on its own
            out = [_safely(lambda g=g: answer(rt, rec, g), task_id) for g in groups]
        rt.store.count("predictions", sum(len(g) for g in groups))
        rt.store.count("predict_batches")
        rt.store.count("predict_seconds_sum", time.monotonic() - t0)
        return {"groups": out}

    _answer(reply, task_id, run)


@app.task(name="worker.tasks.adapter", acks_late=False, ignore_result=True)
def adapter(task_id: str, reply: str) -> None:
    def run(rt: Runtime, rec: dict[str, Any]) -> dict[str, Any]:
        data = rt.adapter_zip(rec)
        if data is None:
            return {"status": 409, "error": "this task's weights hold no LoRA adapter"}
        return {"zip_b64": base64.b64encode(data).decode()}

    _answer(reply, task_id, run)


def _finite(x: Any) -> Any:
    """JSON-safe metrics: NaN/inf (a diverged step) become null instead of breaking the API's JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def job_config(job: dict[str, Any]):
    """The run's MetaTrainConfig; tagged with the job so a redelivered job can find its checkpoint."""
    from model.meta_train import MetaTrainConfig

    steps = job["hyperparameters"].get("steps")
    steps = steps if isinstance(steps, int) else MetaTrainConfig.model_fields["steps"].default  # bad ones: the config says why
    hp = {"save_every": max(1, steps // 10), **job["hyperparameters"]}  # a lost worker costs <= 10% of the run
    return MetaTrainConfig(**{**hp, "method": job["method"], "space": job["space"], "setting": job["setting"],
                              "tag": f"job:{job['id']}"})


@app.task(name="worker.tasks.meta_train", bind=True, time_limit=S.meta_train_time_limit_s,
          soft_time_limit=soft_limit(S.meta_train_time_limit_s))
def meta_train(self, job_id: str) -> str:
    from model import meta_train as mt

    st = Store.from_url(S.redis_url)
    job = st.job(job_id)
    if job is None or job["state"] in ("succeeded", "failed", "cancelled"):
        return "done"  # a redelivery of a finished (or cancelled while queued) job
    cfg = job_config(job)
    if job["state"] == "running":  # this worker died mid-run: continue from the run's last checkpoint
        mine = [m for m in checkpoints_listing() if (m.get("config") or {}).get("tag") == cfg.tag and m.get("step", 0) > 0]
        if mine:
            cfg = cfg.model_copy(update={"resume": mine[-1]["id"]})
    st.update_job(job_id, state="running", started_at=now(), error=None)

    def progress(step: int, total: int, metrics: dict[str, Any]) -> None:
        st.update_job(job_id, progress={"step": step, "steps": total}, metrics=_finite(metrics))

    def should_stop() -> bool:
        rec = st.job(job_id)
        return rec is None or bool(rec.get("cancel"))

    try:
        ckpt = mt.meta_train(cfg, progress=progress, should_stop=should_stop)
    except SoftTimeLimitExceeded:
        st.update_job(job_id, state="failed", finished_at=now(),
                      error=f"meta-training took longer than {soft_limit(S.meta_train_time_limit_s)} s (its checkpoint is kept)")
        return "failed"
    except Exception as e:
        log.exception("meta-training job %s failed", job_id)
        st.update_job(job_id, state="failed", finished_at=now(), error=f"{type(e).__name__}: {e}")
        return "failed"
    stopped = bool((st.job(job_id) or {}).get("cancel"))
    st.update_job(job_id, state="cancelled" if stopped else "succeeded", finished_at=now(), checkpoint=ckpt)
    return ckpt


def checkpoints_listing() -> list[dict[str, Any]]:
    from worker import checkpoints

    return checkpoints.listing(get_settings())
