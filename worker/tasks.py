"""Celery tasks: glue between the records in Redis and model/.

Every task is idempotent: `adapt` delivered twice (a worker died after finishing, or during)
checks the record first and ends with the task ready once; `predict`/`adapter` answer on a
reply list the API waits on with BLPOP, so their results never need the result backend, and
mark the call taken by this process, so that the API, watching this process's heartbeat, sends
the call to another worker within seconds when this one dies.

Each process beats a heartbeat (contract/store.py WORKERS): its model and configuration
fingerprint, its node (whose direct queue reaches it), its roles, and the run it is on. The API
reads them to route calls (app/routing.py), for /readyz, and to queue again a run whose own
worker stopped beating (app/adaptations.py).
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
from contextlib import contextmanager
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import celeryd_after_setup, worker_process_init, worker_process_shutdown
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from contract.blobs import shared, store_of
from contract.config import fingerprint, local_config
from contract.queues import QUEUES, direct, queue
from contract.records import job_config
from contract.store import CANCEL, REPLY, Store, now, retrying, task_weights_key
from model.generation import Sampling
from model.prompts import PromptTooLong
from model.settings import get_settings
from model.task import Limits, Query
from worker import adapters
from worker.celery_app import app
from worker.checkpoints import CheckpointError
from worker.runtime import Misrouted, Refused, Runtime

log = logging.getLogger(__name__)
S = get_settings()
TRANSIENT = (redis.ConnectionError, redis.TimeoutError)  # a Redis restarting: wait, or leave the run to the reaper
# Writes that end an adaptation wait out a Redis restart: the run they save cost minutes.
patient = retry(retry=retry_if_exception_type(TRANSIENT), stop=stop_after_delay(60),
                wait=wait_exponential(multiplier=0.2, max=5), reraise=True)

_runtime: Runtime | None = None
_stop = threading.Event()
_beat_lock = threading.Lock()
_on: dict[str, str] = {}  # the task (or job) and run this process is on, sent with every heartbeat
ME = ""  # this process in the heartbeats: host:pid
NODE = ""  # the Celery worker this process belongs to (its direct queue's name), set before the pool forks
ROLES: list[str] = list(QUEUES)  # the roles it was started with (-Q)
_parent = 0  # a pool child's Celery parent process (0: not a pool child)


@celeryd_after_setup.connect
def _queues(sender: str, instance, **_: Any) -> None:
    """Replace the roles given with -Q by this worker's queues: `adapt.<fingerprint>` and
    `meta.<fingerprint>`, shared with the workers of the same configuration, and its direct
    queue for the API's calls (contract/queues.py). In the parent, before the pool forks: the
    children inherit NODE and ROLES; the fingerprint needs no model loaded (its files' hash)."""
    global NODE, ROLES
    NODE = sender
    queues = instance.app.amqp.queues
    ROLES = [r for r in QUEUES if r in (queues.consume_from or QUEUES)]
    fp = fingerprint(local_config(S))
    for name in list(queues.consume_from or queues):
        queues.deselect(name)
    queues.select_add(direct(NODE))  # first: the queue order is the priority order
    for role in ("adapt", "meta"):
        if role in ROLES:
            queues.select_add(queue(role, fp))
    log.info("worker %s: roles %s, configuration %s", NODE, ",".join(ROLES), fp)


def runtime() -> Runtime:
    """The process's model, loaded on first use (the solo pool sends no worker_process_init)."""
    global _runtime, ME
    if _runtime is None:
        ME = f"{socket.gethostname()}:{os.getpid()}"
        _runtime = Runtime(get_settings(), NODE or ME)
        threading.Thread(target=_heartbeat, args=(_runtime,), daemon=True).start()
    return _runtime


def _model_info(rt: Runtime) -> dict[str, Any]:
    return {"model": rt.lm.name, "sha256": rt.lm.sha256, "device": str(rt.lm.device), "node": NODE,
            "roles": ROLES, "fingerprint": rt.fingerprint, "config": rt.config}


def _beat(rt: Runtime) -> None:
    # Under the lock: a beat never carries an older run than one written before it.
    with _beat_lock:
        rt.store.beat(ME, {**_model_info(rt), **_on})


def _heartbeat(rt: Runtime) -> None:
    """Tell /readyz that a process with the model loaded is alive, and the reaper which run it is on.
    A pool child whose Celery parent was killed exits: nothing would take its calls or acknowledge
    its message, and it must not look alive (the API routes calls by heartbeat)."""
    while not _stop.is_set():
        if _parent and os.getppid() != _parent:
            log.error("the worker's parent process %d is gone: exiting", _parent)
            os._exit(1)
        try:
            _beat(rt)
        except Exception:  # Redis away for a moment: the next beat tries again
            log.warning("heartbeat failed", exc_info=True)
        _stop.wait(S.heartbeat_s)
    rt.store.gone(ME)


@contextmanager
def running(rt: Runtime, task_id: str, run: str | None):
    """The heartbeat says this run (of a task, or a meta-training job's) from before the caller
    claims it until after it has let it go."""
    global _on
    with _beat_lock:
        _on = {"task": task_id, "run": run}
    _beat(rt)
    try:
        yield
    finally:
        with _beat_lock:
            _on = {}
        try:
            _beat(rt)
        except Exception:  # the heartbeat thread says it within heartbeat_s
            log.warning("heartbeat failed", exc_info=True)


@worker_process_init.connect
def _load_model(**_: Any) -> None:
    # In the pool child, never the parent: CUDA must not be initialised before the fork.
    global _parent
    _parent = os.getppid()
    runtime()


@worker_process_shutdown.connect
def _unload(**_: Any) -> None:
    _stop.set()


class Gone(Exception):
    """The task record was deleted, or its run superseded, while the worker was on it."""


def soft_limit(hard: int) -> int:
    # The soft limit lands between two steps (a step of a big model can take a while) and marks
    # the record failed; the hard limit's kill would leave it "adapting".
    return max(1, hard - max(30, hard // 10))


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
    if rec["status"] == "adapting" and rec.get("worker") != ME and st.runs(rec.get("worker"), run, S.worker_dead_after_s):
        return "running elsewhere"  # a redelivery while the first delivery is still running

    with running(rt, task_id, run):
        if not st.claim_task(task_id, run, ME, rec.get("worker"), started_at=now(), step=0, epoch=0.0,
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


@retrying
def _reply(st: Store, key: str, body: dict[str, Any]) -> None:
    st.r.pipeline().rpush(key, json.dumps(body)).expire(key, 120).execute()


def _answer(reply: str, task_id: str, fn) -> None:
    """Run fn(runtime, record) and push its result, or the error as a status and message, to the reply list."""
    rt = runtime()
    _take(rt, reply)
    key = REPLY + reply
    # Patient: the caller waits on its reply list through a Redis restart, so the answer should come.
    rec = patient(rt.store.task)(task_id)
    if rec is None:
        return patient(_reply)(rt.store, key, {"status": 404, "error": f"task {task_id} not found"})
    patient(_reply)(rt.store, key, _safely(lambda: fn(rt, rec), task_id))


def _take(rt: Runtime, reply: str) -> None:
    """Say that this process has the call: the API watches its heartbeat, not only its node's."""
    try:
        rt.store.take(reply, ME, int(S.predict_timeout_s) + 60)
    except TRANSIENT:  # the API still watches the node; a Redis away has the caller waiting anyway
        log.warning("call %s: not marked taken (Redis unavailable)", reply)


def _safely(fn, task_id: str) -> dict[str, Any]:
    """fn()'s answer, or its error as the status and message the API returns."""
    try:
        return fn()
    except Exception as e:
        return _error(e, task_id)


def _error(e: Exception, task_id: str) -> dict[str, Any]:
    if isinstance(e, Refused):
        return {"status": 409, "error": str(e)}
    if isinstance(e, Misrouted):
        return {"status": 503, "error": str(e)}
    if isinstance(e, (PromptTooLong, CheckpointError, ValueError)):
        return {"status": 422, "error": str(e)}
    if isinstance(e, TRANSIENT):  # the cache Redis restarting: the caller retries
        return {"status": 503, "error": f"the service's Redis is unavailable ({type(e).__name__}); retry"}
    log.exception("request on %s failed", task_id, exc_info=e)
    return {"status": 500, "error": f"{type(e).__name__}: {e}"}


BACKLOG = 8  # messages of a stream waiting in Redis for the API: the worker makes no more until it takes some
STALL_S = 60.0  # a stream nobody reads for this long is abandoned


def _stream(reply: str, task_id: str, fn) -> None:
    """Run fn(runtime, record, stopped), an iterator of messages, pushing each to the reply list as
    it comes, and a last one with end=True: fn's last (it says end itself) or the error, as a status
    and why. Stops as soon as the caller went away (the API sets the cancel key), or stops reading."""
    rt = runtime()
    _take(rt, reply)
    key, cancel = REPLY + reply, CANCEL + reply
    rec = patient(rt.store.task)(task_id)
    if rec is None:
        return patient(_reply)(rt.store, key, {"status": 404, "error": f"task {task_id} not found", "end": True})

    def stopped() -> bool:
        return bool(rt.store.r.exists(cancel))

    try:
        for msg in fn(rt, rec, stopped):
            waited = 0.0
            while rt.store.r.llen(key) >= BACKLOG:
                if stopped() or waited > STALL_S:
                    return
                time.sleep(0.05)
                waited += 0.05
            if stopped():
                return
            patient(_reply)(rt.store, key, msg)
    except Exception as e:
        patient(_reply)(rt.store, key, {**_error(e, task_id), "end": True})


# acks_late off: a lost prediction is retried by its caller, not replayed an hour later.
@app.task(name="worker.tasks.predict", acks_late=False, ignore_result=True)
def predict(task_id: str, groups: list[list[dict[str, Any]]], reply: str) -> None:
    """Answer several callers' queries on one task in one batch; each group gets its own reply."""

    def answer(rt: Runtime, rec: dict[str, Any], group: list[dict[str, Any]]) -> dict[str, Any]:
        limits = {"limits": Limits.of(rt.s)}  # the operator's limits, not model/'s defaults
        preds = rt.predict(rec, [Query.model_validate(q, context=limits) for q in group])
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


@app.task(name="worker.tasks.generate", acks_late=False, ignore_result=True)
def generate(task_id: str, text: str, sampling: dict[str, Any], reply: str) -> None:
    """Generated text for one input, streamed: {text, tokens} pieces, the last with finish and end."""
    def run(rt: Runtime, rec: dict[str, Any], stopped):
        t0 = time.monotonic()
        for piece in rt.generate(rec, text, Sampling(**{**sampling, "stop": tuple(sampling.get("stop") or ())}), stopped):
            yield {"text": piece.text, "tokens": piece.tokens, "finish": piece.finish, "end": piece.finish is not None}
        rt.store.count("generations")
        rt.store.count("predict_seconds_sum", time.monotonic() - t0)

    _stream(reply, task_id, run)


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

    _stream(reply, task_id, run)


@app.task(name="worker.tasks.import_adapter", acks_late=False, ignore_result=True)
def import_adapter(rec: dict[str, Any], zip_b64: str, max_bytes: int, reply: str) -> None:
    """Check and store an adapter for a task record the API will create: the fields that point at it."""
    rt = runtime()
    _take(rt, reply)
    body = _safely(lambda: adapters.import_adapter(rt, rec, base64.b64decode(zip_b64), max_bytes), rec["id"])
    patient(_reply)(rt.store, REPLY + reply, body)


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
    if job["state"] == "running" and job.get("worker") != ME and st.runs(job.get("worker"), run, S.worker_dead_after_s):
        return "running elsewhere"  # a redelivery while the first delivery is still running
    cfg = job_config(job, S)
    mine = [m for m in checkpoints_listing() if (m.get("config") or {}).get("tag") == cfg.tag and m.get("step", 0) > 0]
    if mine:  # a worker died mid-run: continue from the run's last checkpoint
        cfg = cfg.model_copy(update={"resume": mine[-1]["id"]})

    def mine_still() -> bool:
        rec = st.job(job_id)
        return rec is not None and rec.get("worker") == ME

    def progress(step: int, total: int, metrics: dict[str, Any]) -> None:
        if mine_still():
            st.update_job(job_id, progress={"step": step, "steps": total}, metrics=_finite(metrics))

    def should_stop() -> bool:
        rec = st.job(job_id)
        return rec is None or bool(rec.get("cancel")) or rec.get("worker") != ME

    with running(rt, job_id, run):
        st.update_job(job_id, state="running", worker=ME, started_at=job.get("started_at") or now(), error=None)
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
