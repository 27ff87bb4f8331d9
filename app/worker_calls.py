"""Request/reply with the worker: send a Celery task, wait for its answer on a Redis list.

BLPOP on a per-call key keeps each answer with its caller; Celery's result backend would
share one pub/sub connection between the API's threads.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from celery import Celery
from fastapi import HTTPException, status

from model.settings import Settings
from worker.store import REPLY, Store


def call_worker(celery: Celery, store: Store, s: Settings, name: str, args: list[Any]) -> dict[str, Any]:
    reply = uuid.uuid4().hex
    timeout = s.predict_timeout_s
    # expires: a call nobody waits for any more is dropped by the worker, not run late.
    celery.send_task(name, args=[*args, reply], ignore_result=True, expires=timeout)
    deadline = time.monotonic() + timeout
    got = None
    while got is None and (left := deadline - time.monotonic()) > 0:
        # short waits: redis-py's socket timeout (5 s by default) must outlast each BLPOP
        got = store.r.blpop([REPLY + reply], timeout=min(2.0, max(left, 0.01)))
    if got is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"no worker answered within {timeout:g} s")
    body = json.loads(got[1])
    if "status" in body:
        raise HTTPException(body["status"], body["error"])
    return body
