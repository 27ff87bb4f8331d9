"""Answers to the API's calls: pushed to the reply list the caller waits on with BLPOP, whole
(answer) or as a stream of messages (stream), errors as the status and message the API returns."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from contract.store import CANCEL, REPLY, Store, retrying
from model.prompts import PromptTooLong
from model.settings import get_settings
from worker import process
from worker.checkpoints import CheckpointError
from worker.errors import TRANSIENT, patient
from worker.process import runtime
from worker.runtime import Misrouted, Refused, Runtime

log = logging.getLogger(__name__)
S = get_settings()


@retrying
def push(st: Store, key: str, body: dict[str, Any]) -> None:
    st.r.pipeline().rpush(key, json.dumps(body)).expire(key, 120).execute()


def answer(reply: str, task_id: str, fn) -> None:
    """Run fn(runtime, record) and push its result, or the error as a status and message, to the reply list."""
    rt = runtime()
    take(rt, reply)
    key = REPLY + reply
    # Patient: the caller waits on its reply list through a Redis restart, so the answer should come.
    rec = patient(rt.store.task)(task_id)
    if rec is None:
        return patient(push)(rt.store, key, {"status": 404, "error": f"task {task_id} not found"})
    patient(push)(rt.store, key, safely(lambda: fn(rt, rec), task_id))


def take(rt: Runtime, reply: str) -> None:
    """Say that this process has the call: the API watches its heartbeat, not only its node's."""
    try:
        rt.store.take(reply, process.ME, int(S.predict_timeout_s) + 60)
    except TRANSIENT:  # the API still watches the node; a Redis away has the caller waiting anyway
        log.warning("call %s: not marked taken (Redis unavailable)", reply)


def safely(fn, task_id: str) -> dict[str, Any]:
    """fn()'s answer, or its error as the status and message the API returns."""
    try:
        return fn()
    except Exception as e:
        return error_body(e, task_id)


def error_body(e: Exception, task_id: str) -> dict[str, Any]:
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


def stream(reply: str, task_id: str, fn) -> None:
    """Run fn(runtime, record, stopped), an iterator of messages, pushing each to the reply list as
    it comes, and a last one with end=True: fn's last (it says end itself) or the error, as a status
    and why. Stops as soon as the caller went away (the API sets the cancel key), or stops reading."""
    rt = runtime()
    take(rt, reply)
    key, cancel = REPLY + reply, CANCEL + reply
    rec = patient(rt.store.task)(task_id)
    if rec is None:
        return patient(push)(rt.store, key, {"status": 404, "error": f"task {task_id} not found", "end": True})

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
            patient(push)(rt.store, key, msg)
    except Exception as e:
        patient(push)(rt.store, key, {**error_body(e, task_id), "end": True})

