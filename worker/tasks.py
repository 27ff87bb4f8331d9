"""Celery tasks: glue between the records in Redis and model/.

Every task is idempotent: `adapt` delivered twice (a worker died after finishing, or during)
checks the record first and ends with the task ready once; `predict`/`adapter` answer on a
reply list the API waits on with BLPOP, so their results never need the result backend, and
mark the call taken by this process, so that the API, watching this process's heartbeat, sends
the call to another worker within seconds when this one dies.

The process (its name, queues, model and heartbeat) is worker/process.py; the replies to the
API's calls, worker/replies.py.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from contract.blobs import shared, store_of
from contract.records import job_config
from contract.store import REPLY, now, task_weights_key
from model.generation import Sampling
from model.prompts import PromptTooLong
from model.settings import get_settings
from model.task import Limits, Query
from worker import adapters, process, replies
from worker.celery_app import app
from worker.checkpoints import CheckpointError
from worker.errors import TRANSIENT, Gone, patient, soft_limit
from worker.process import running, runtime
from worker.runtime import Runtime

log = logging.getLogger(__name__)
S = get_settings()


@app.task(name="worker.tasks.adapt", bind=True, time_limit=S.adapt_time_limit_s, soft_time_limit=soft_limit(S.adapt_time_limit_s))
def adapt(self, task_id: str, run: str | None = None) -> str:
    """Adapt the task's current run. `run` is None in messages sent before runs had ids: the record's run."""
    rt = runtime()
    st = rt.store
    rec = st.task(task_id)
    if rec is None:
        return "deleted"
    run = run or rec.get("run")
    if rec.get("run") != run:
        return "superseded"  # the reaper, or a repost after a failure, gave the task a new run
    if rec.get("fingerprint") not in (None, rt.fingerprint):  # its queue is its configuration's: never expected
        log.error("task %s: configuration %s, this worker's is %s; not adapting it", task_id, rec["fingerprint"],
                  rt.fingerprint)
        return "misrouted"
    if rec["status"] == "ready" and rt.load_weights(rec) is not None:
        return "ready"  # a redelivery after the work was done
    if rec["status"] == "failed":
        return "failed"  # a redelivery after the run failed; posting the task again retries it
    if rec["status"] == "adapting" and rec.get("worker") != process.ME and st.runs(rec.get("worker"), run, S.worker_dead_after_s):
        return "running elsewhere"  # a redelivery while the first delivery is still running

    with running(rt, task_id, run):
        if not st.claim_task(task_id, run, process.ME, rec.get("worker"), started_at=now(), step=0, epoch=0.0,
                             n_steps=rec["steps"], error=None, eta_s=None, stopped=None):
            return "superseded"
        return _adapt(rt, rec, run)


def _adapt(rt: Runtime, rec: dict[str, Any], run: str | None) -> str:
    st, task_id = rt.store, rec["id"]
    per_step = rec.get("epochs", 0.0) / max(rec["steps"], 1)  # epochs are steps x batch / demonstrations
    t0 = time.monotonic()
    first: list[float] = []  # when step 1 ended: the mean step time counts from there (setup excluded)

    def eta(i: int, n: int) -> float:
        """Seconds left for the training steps: the mean step time so far x the steps left, at
        most what is left of the time budget (the loop stops there)."""
        t = time.monotonic()
        if not first:
            first.append(t)
        mean = (t - first[0]) / (i - 1) if i > 1 else t - t0
        return round(max(0.0, min(mean * (n - i), rt.s.adapt_time_budget_s - (t - t0))), 1)

    def on_step(i: int, n: int, loss: float) -> None:
        try:  # a deleted task (or a superseded run) makes this False: Gone ends the loop at this step
            if not st.update_task(task_id, run=run, step=i, n_steps=n, epoch=round(i * per_step, 3), loss=loss,
                                  eta_s=eta(i, n)):
                raise Gone(task_id)
        except TRANSIENT:  # progress is not worth stopping for: the run goes on while Redis restarts
            log.warning("task %s: progress not recorded (Redis unavailable)", task_id)

    def fail(error: str) -> str:
        st.update_task(task_id, run=run, status="failed", finished_at=now(), error=error)
        return "failed"

    try:
        try:
            result = rt.run_adaptation(rec, on_step)
        finally:  # the worker's time is spent whether the run ends well or not
            st.add_adapt_seconds(rec["tenant"], time.monotonic() - t0)
        pointer = patient(rt.store_weights)(rec, result)
        size = patient(_weights_size)(rt, rec, pointer)
        st.note_weights_size(rec["mode"], size)
        if patient(st.charge)(rec["tenant"], "weights_bytes", size, S.max_weights_bytes) is None:
            rt.drop_weights({**rec, **pointer})
            return fail(f"the adapted weights ({size} bytes) would take this tenant's stored weights over the limit of "
                        f"{S.max_weights_bytes} bytes: delete tasks to make room, then post this one again")
        done = patient(st.finish_task)(task_id, run, finished_at=now(), loss_before=result.loss_before,
                                       loss_after=result.loss_after, weights_bytes=size, step=result.steps,
                                       n_steps=result.planned, epoch=round(result.epochs, 3), eta_s=None,
                                       stopped=result.stopped,
                                       adapt_seconds=round(time.monotonic() - t0, 3), **pointer)
    except Gone:
        return "deleted"
    except TRANSIENT:  # a Redis stayed away: the record still says adapting, the reaper queues it again
        log.warning("task %s: Redis unavailable; leaving the run to the reaper", task_id, exc_info=True)
        return "interrupted"
    except SoftTimeLimitExceeded:
        return fail(f"adaptation took longer than {soft_limit(S.adapt_time_limit_s)} s")
    except (PromptTooLong, CheckpointError, ValueError) as e:
        return fail(str(e))
    except Exception as e:  # an unexpected error: the record says what, the log has the traceback
        log.exception("adaptation of %s failed", task_id)
        return fail(f"{type(e).__name__}: {e}")
    if not done:
        st.refund(rec["tenant"], "weights_bytes", size)
        if st.task(task_id) is None:  # deleted while adapting: do not leave its weights behind
            rt.drop_weights({**rec, **pointer})
        return "superseded"  # another run owns the record (and the same weights key): leave them
    st.observe_adaptation(time.monotonic() - t0)
    return "ready"


def _weights_size(rt: Runtime, rec: dict[str, Any], pointer: dict[str, Any]) -> int:
    """Bytes the task's stored weights take (LoRA or a full-mode delta, in the cache)."""
    key = task_weights_key({**rec, **pointer})
    return int(store_of(rt.s, key).size(key) or 0)


def queries(group: list[dict[str, Any]], limits: Limits) -> list[Query] | Exception:
    """One caller's queries, or why they are invalid (raised by `valid` where they are used)."""
    try:
        return [Query.model_validate(q, context={"limits": limits}) for q in group]
    except Exception as e:
        return e


def valid(built: list[Query] | Exception) -> list[Query]:
    if isinstance(built, Exception):
        raise built
    return built


# acks_late off: a lost prediction is retried by its caller, not replayed an hour later.
@app.task(name="worker.tasks.predict", acks_late=False, ignore_result=True)
def predict(task_id: str, groups: list[list[dict[str, Any]]], reply: str) -> None:
    """Answer several callers' queries on one task in one batch; each group gets its own reply.
    Each query ({input, options?}, as the API validated it) becomes a Query here, once."""

    def answer(rt: Runtime, rec: dict[str, Any], group: list[Query]) -> dict[str, Any]:
        preds = rt.predict(rec, group)
        return {"predictions": [{"output": p.output, "scores": p.scores} for p in preds]}

    def run(rt: Runtime, rec: dict[str, Any]) -> dict[str, Any]:
        t0 = time.monotonic()
        built = [queries(g, Limits.of(rt.s)) for g in groups]  # the operator's limits, not model/'s defaults
        try:
            merged = answer(rt, rec, [q for b in built for q in valid(b)])["predictions"]
            out, i = [], 0
            for g in groups:
                out.append({"predictions": merged[i: i + len(g)]})
                i += len(g)
        except Exception:  # one caller's input broke the batch: answer each on its own
            out = [replies.safely(lambda b=b: answer(rt, rec, valid(b)), task_id) for b in built]
        rt.store.count("predictions", sum(len(g) for g in groups))
        rt.store.count("predict_batches")
        rt.store.count("predict_seconds_sum", time.monotonic() - t0)
        return {"groups": out}

    replies.answer(reply, task_id, run)


@app.task(name="worker.tasks.generate", acks_late=False, ignore_result=True)
def generate(task_id: str, text: str, sampling: dict[str, Any], reply: str) -> None:
    """Generated text for one input, streamed: {text, tokens} pieces, the last with finish and end."""
    def run(rt: Runtime, rec: dict[str, Any], stopped):
        t0 = time.monotonic()
        for piece in rt.generate(rec, text, Sampling(**{**sampling, "stop": tuple(sampling.get("stop") or ())}), stopped):
            yield {"text": piece.text, "tokens": piece.tokens, "finish": piece.finish, "end": piece.finish is not None}
        rt.store.count("generations")
        rt.store.count("predict_seconds_sum", time.monotonic() - t0)

    replies.stream(reply, task_id, run)


CHUNK = 4 << 20  # bytes of an export per message


@app.task(name="worker.tasks.adapter", acks_late=False, ignore_result=True)
def adapter(task_id: str, kind: str, reply: str) -> None:
    """The task's weights as a zip (worker/adapters.py export), streamed: {kind, size}, then base64 chunks, then end."""
    def run(rt: Runtime, rec: dict[str, Any], stopped):
        got, data = adapters.export(rt, rec, kind)
        yield {"kind": got, "size": len(data)}
        for i in range(0, len(data), CHUNK):
            yield {"chunk": base64.b64encode(data[i: i + CHUNK]).decode()}
        yield {"end": True}

    replies.stream(reply, task_id, run)


@app.task(name="worker.tasks.import_adapter", acks_late=False, ignore_result=True)
def import_adapter(rec: dict[str, Any], zip_b64: str, max_bytes: int, reply: str) -> None:
    """Check and store an adapter for a task record the API will create: the fields that point at it."""
    rt = runtime()
    replies.take(rt, reply)
    body = replies.safely(lambda: adapters.import_adapter(rt, rec, base64.b64decode(zip_b64), max_bytes), rec["id"])
    patient(replies.push)(rt.store, REPLY + reply, body)


def _finite(x: Any) -> Any:
    """JSON-safe metrics: NaN/inf (a diverged step) become null instead of breaking the API's JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


@app.task(name="worker.tasks.meta_train", bind=True, time_limit=S.meta_train_time_limit_s,
          soft_time_limit=soft_limit(S.meta_train_time_limit_s))
def meta_train(self, job_id: str) -> str:
    """Run a meta-training job, its checkpoints in the shared registry and its tasks from the bank
    in the shared store (contract/blobs.py): any worker can run it, or continue it from its last
    checkpoint when the worker that ran it died (the API's reaper sends it again)."""
    from model import meta_train as mt

    rt = runtime()
    st = rt.store
    job = st.job(job_id)
    if job is None or job["state"] in ("succeeded", "failed", "cancelled"):
        return "done"  # a redelivery of a finished (or cancelled while queued) job
    run = f"job:{job_id}"
    if job["state"] == "running" and job.get("worker") != process.ME and st.runs(job.get("worker"), run, S.worker_dead_after_s):
        return "running elsewhere"  # a redelivery while the first delivery is still running
    cfg = job_config(job, S)
    mine = [m for m in checkpoints_listing() if (m.get("config") or {}).get("tag") == cfg.tag and m.get("step", 0) > 0]
    if mine:  # a worker died mid-run: continue from the run's last checkpoint
        cfg = cfg.model_copy(update={"resume": mine[-1]["id"]})

    def mine_still() -> bool:
        rec = st.job(job_id)
        return rec is not None and rec.get("worker") == process.ME

    def progress(step: int, total: int, metrics: dict[str, Any]) -> None:
        if mine_still():
            st.update_job(job_id, progress={"step": step, "steps": total}, metrics=_finite(metrics))

    def should_stop() -> bool:
        rec = st.job(job_id)
        return rec is None or bool(rec.get("cancel")) or rec.get("worker") != process.ME

    with running(rt, job_id, run):
        st.update_job(job_id, state="running", worker=process.ME, started_at=job.get("started_at") or now(), error=None)
        try:
            source = mt.task_source(cfg.setting, shared(S))
            ckpt = mt.meta_train(cfg, progress=progress, should_stop=should_stop, source=source, registry=shared(S))
        except SoftTimeLimitExceeded:
            st.update_job(job_id, state="failed", finished_at=now(),
                          error=f"meta-training took longer than {soft_limit(S.meta_train_time_limit_s)} s (its checkpoint is kept)")
            return "failed"
        except Exception as e:
            log.exception("meta-training job %s failed", job_id)
            st.update_job(job_id, state="failed", finished_at=now(), error=f"{type(e).__name__}: {e}")
            return "failed"
    if not mine_still():
        return "superseded"  # the reaper gave the job to another worker meanwhile: it finishes it
    stopped = bool((st.job(job_id) or {}).get("cancel"))
    st.update_job(job_id, state="cancelled" if stopped else "succeeded", finished_at=now(), checkpoint=ckpt)
    return ckpt


def checkpoints_listing() -> list[dict[str, Any]]:
    from worker import checkpoints

    return checkpoints.listing(get_settings())
