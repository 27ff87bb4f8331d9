"""Request/reply with the worker: send a Celery task, wait for its answer on a Redis list.

BLPOP on a per-call key keeps each answer with its caller; Celery's result backend would
share one pub/sub connection between callers. The wait is asyncio's (redis.asyncio): a call
waiting for the worker holds no thread, so waiting callers cannot use up the API's threads.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
import redis
import redis.asyncio
from celery import Celery
from fastapi import HTTPException, status

from app.errors import public
from worker.store import CANCEL, REPLY


def worker_error(body: dict[str, Any]) -> HTTPException:
    """The worker's error reply as the API's answer; a 503 (a Redis restarting) says when to retry."""
    headers = {"Retry-After": "2"} if body["status"] == 503 else None
    return HTTPException(body["status"], public(body["error"]), headers=headers)


async def _send(celery: Celery, timeout_s: float, name: str, args: list[Any]) -> str:
    reply = uuid.uuid4().hex
    # expires: a call nobody waits for any more is dropped by the worker, not run late.
    await anyio.to_thread.run_sync(
        lambda: celery.send_task(name, args=[*args, reply], ignore_result=True, expires=timeout_s))
    return reply


async def _next(replies: redis.asyncio.Redis, reply: str, timeout_s: float) -> dict[str, Any]:
    """The next message on the reply list; 503 when none comes within timeout_s."""
    deadline = time.monotonic() + timeout_s
    got = None
    while got is None and (left := deadline - time.monotonic()) > 0:
        try:  # short waits: a Redis restart surfaces within seconds rather than at the deadline
            got = await replies.blpop([REPLY + reply], timeout=min(2.0, max(left, 0.01)))
        except (redis.ConnectionError, redis.TimeoutError):
            # Redis restarted (a pooled connection went stale) or is away: the reply list outlives
            # a restart (the worker retries its push, the records Redis keeps its AOF), so wait on.
            await anyio.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
    if got is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"no worker answered within {timeout_s:g} s",
                            headers={"Retry-After": "5"})
    return json.loads(got[1])


async def call_worker(celery: Celery, replies: redis.asyncio.Redis, timeout_s: float, name: str,
                      args: list[Any]) -> dict[str, Any]:
    reply = await _send(celery, timeout_s, name, args)
    body = await _next(replies, reply, timeout_s)
    if "status" in body:
        raise worker_error(body)
    return body


async def stream_worker(celery: Celery, replies: redis.asyncio.Redis, timeout_s: float, name: str,
                        args: list[Any]) -> AsyncIterator[dict[str, Any]]:
    """The worker's messages for one call as they come (worker/tasks.py `_stream`), up to the one
    that says end. An error message raises (HTTPException). Closed early (the client went away),
    it tells the worker to stop: the cancel key, which the worker reads between steps."""
    reply = await _send(celery, timeout_s, name, args)
    ended = False
    try:
        while not ended:
            body = await _next(replies, reply, timeout_s)
            if "status" in body:
                ended = True
                raise worker_error(body)
            ended = bool(body.get("end"))
            yield body
    finally:
        if not ended:
            with anyio.CancelScope(shield=True):
                try:
                    await replies.set(CANCEL + reply, 1, ex=300)
                    await replies.delete(REPLY + reply)
                except (redis.ConnectionError, redis.TimeoutError):  # the worker stops at its stall limit
                    pass
