"""Calls the API makes to one worker (predictions, exports, generation, imports): which worker,
and what happens when it dies.

Each call goes to the direct queue of one live worker (contract/queues.py) that takes the
`predict` role and runs the task's configuration (contract/config.py): the one with the fewest of
this API's calls in flight, preferring workers that are not adapting (a worker runs one thing at
a time). The worker marks the call taken by its process (contract/store.py TAKEN). While the API
waits for the answer it watches, every half second, the heartbeat of that process (or, until it
is taken, of any process of that worker): silent for `predict_dead_after_s`, the worker is dead,
and a call that is safe to repeat goes to another live worker at once. So a killed worker costs
its callers a few seconds, not the whole timeout, and a call it had taken is not lost. A call
that waits untaken behind an adaptation goes to an idle worker after the same delay. With no
live worker for the configuration, the answer is a 503 whose Retry-After is a few seconds.

The answer comes on a per-call Redis list the API waits on with BLPOP (Celery's result backend
would share one pub/sub connection between callers), with redis.asyncio: a waiting call holds no
thread, so waiting callers cannot use up the API's threads. The heartbeats are read from Redis at
most every 0.25 s and shared by all waiting calls.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
import redis
import redis.asyncio
from celery import Celery
from fastapi import HTTPException, status

from app.errors import public
from contract.queues import direct
from contract.store import CANCEL, REPLY, TAKEN, WORKERS
from model.settings import Settings

log = logging.getLogger(__name__)
TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
REFRESH_S = 0.25  # heartbeats read at most this often
CHECK_S = 0.5  # how often a waiting call looks at its worker


def worker_error(body: dict[str, Any]) -> HTTPException:
    """The worker's error reply as the API's answer; a 503 (a Redis restarting) says when to retry."""
    headers = {"Retry-After": "2"} if body["status"] == 503 else None
    return HTTPException(body["status"], public(body["error"]), headers=headers)


class WorkerGone(Exception):
    """The worker holding a call died (or the call waited untaken while another worker is idle)."""


class Router:
    def __init__(self, celery: Celery, replies: redis.asyncio.Redis, s: Settings):
        self.celery, self.replies, self.s = celery, replies, s
        self.dead_after = s.predict_dead_after_s
        self.inflight: Counter[str] = Counter()  # node -> this API's calls there
        self._live: dict[str, dict[str, Any]] = {}
        self._read_at = -math.inf

    # --- who is alive
    async def live(self) -> dict[str, dict[str, Any]]:
        """Worker processes that beat within predict_dead_after_s: process -> heartbeat."""
        if time.monotonic() - self._read_at > REFRESH_S:
            try:
                raw = await self.replies.hgetall(WORKERS)
            except TRANSIENT:  # Redis restarting: the last view stands until it is back
                return self._live
            t = time.time()
            self._live = {p: info for p, v in raw.items() if t - (info := json.loads(v))["at"] <= self.dead_after}
            self._read_at = time.monotonic()
        return self._live

    def nodes(self, live: dict[str, dict[str, Any]], fingerprint: str) -> dict[str, bool]:
        """The workers (nodes) that answer calls for this configuration -> whether one is busy on a run."""
        out: dict[str, bool] = {}
        for info in live.values():
            if info.get("fingerprint") == fingerprint and "predict" in info.get("roles", ()) and info.get("node"):
                out[info["node"]] = out.get(info["node"], False) or bool(info.get("run"))
        return out

    def lanes(self, fingerprint: str) -> int:
        """How many calls of one task may be in flight at once: one per live worker (at least one)."""
        return max(1, len(self.nodes(self._live, fingerprint)))

    async def pick(self, fingerprint: str, avoid: set[str]) -> str | None:
        nodes = self.nodes(await self.live(), fingerprint)
        ranked = sorted(nodes, key=lambda n: (n in avoid, nodes[n], self.inflight[n], random.random()))
        return ranked[0] if ranked else None

    async def no_worker(self, fingerprint: str) -> HTTPException:
        others = sorted({i.get("fingerprint") for i in (await self.live()).values()} - {fingerprint})
        why = f"; live workers run other configurations ({', '.join(map(str, others))}): see /readyz" if others else ""
        return HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                             f"no live worker answers for this task's configuration ({fingerprint}){why}; retry",
                             headers={"Retry-After": str(max(1, math.ceil(self.dead_after)))})

    async def _gone(self, node: str, reply: str, fingerprint: str, since: float) -> bool:
        try:
            taken = await self.replies.get(TAKEN + reply)
        except TRANSIENT:
            return False  # cannot tell: keep waiting
        live = await self.live()
        if taken:
            return taken not in live
        nodes = self.nodes(live, fingerprint)
        if node not in nodes:
            return True
        # alive but busy on a run (one thing at a time) while another worker is idle: go there
        return nodes[node] and time.monotonic() - since > self.dead_after and not all(nodes.values())

    # --- one call
    async def _send(self, node: str, name: str, args: list[Any], timeout_s: float) -> str:
        reply = uuid.uuid4().hex
        # expires: a call nobody waits for any more (its worker was dead) is dropped, not run late
        await anyio.to_thread.run_sync(lambda: self.celery.send_task(
            name, args=[*args, reply], queue=direct(node), ignore_result=True, expires=timeout_s))
        return reply

    async def _next(self, node: str, reply: str, fingerprint: str, deadline: float, since: float) -> dict[str, Any]:
        """The call's next message; WorkerGone when its worker died; 503 at the deadline."""
        while (left := deadline - time.monotonic()) > 0:
            try:  # short waits: a Redis restart or a dead worker surfaces within a second
                got = await self.replies.blpop([REPLY + reply], timeout=min(CHECK_S, max(left, 0.01)))
            except TRANSIENT:
                # The reply list outlives a restart (the worker retries its push, the records Redis
                # keeps its AOF), so wait on.
                await anyio.sleep(min(0.5, max(deadline - time.monotonic(), 0)))
                continue
            if got is not None:
                return json.loads(got[1])
            if await self._gone(node, reply, fingerprint, since):
                raise WorkerGone(node)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"no worker answered within {self.s.predict_timeout_s:g} s",
                            headers={"Retry-After": "5"})

    async def _message(self, node: str, reply: str, fingerprint: str, deadline: float) -> dict[str, Any] | None:
        """The call's next message, counted as in flight on its worker; None when the worker is gone."""
        self.inflight[node] += 1
        try:
            return await self._next(node, reply, fingerprint, deadline, time.monotonic())
        except WorkerGone:
            log.warning("call %s on %s: its worker is gone", reply, node)
            return None
        finally:
            self.inflight[node] -= 1

    async def _start(self, fingerprint: str, name: str, args: list[Any], avoid: set[str]) -> tuple[str, str]:
        """(node, reply) of the call sent to the best live worker not in avoid; 503 when there is none."""
        node = await self.pick(fingerprint, avoid)
        if node is None:
            raise await self.no_worker(fingerprint)
        return node, await self._send(node, name, args, self.s.predict_timeout_s)

    async def call(self, fingerprint: str, name: str, args: list[Any]) -> dict[str, Any]:
        """The worker's answer to one call that is safe to repeat, sent again to another worker
        whenever the one holding it dies. The worker's error reply raises (HTTPException)."""
        deadline = time.monotonic() + self.s.predict_timeout_s
        avoid: set[str] = set()
        while True:
            node, reply = await self._start(fingerprint, name, args, avoid)
            body = await self._message(node, reply, fingerprint, deadline)
            if body is None:
                avoid.add(node)
                continue
            if "status" in body:
                raise worker_error(body)
            return body

    async def stream(self, fingerprint: str, name: str, args: list[Any]) -> AsyncIterator[dict[str, Any]]:
        """The worker's messages for one call as they come (worker/replies.py `stream`), up to the
        one that says end. Sent again elsewhere when its worker dies before the first message;
        after it, a 503 (what was streamed cannot be taken back). An error message raises. Closed
        early (the client went away), it tells the worker to stop (the cancel key)."""
        deadline = time.monotonic() + self.s.predict_timeout_s
        avoid: set[str] = set()
        started = ended = False
        node = reply = ""
        try:
            while not ended:
                if not started:
                    node, reply = await self._start(fingerprint, name, args, avoid)
                body = await self._message(node, reply, fingerprint, deadline)
                if body is None:
                    if started:
                        ended = True
                        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the worker died while answering; retry",
                                            headers={"Retry-After": "1"})
                    avoid.add(node)
                    continue
                started = True
                if "status" in body:
                    ended = True
                    raise worker_error(body)
                ended = bool(body.get("end"))
                yield body
        finally:
            if reply and not ended:
                with anyio.CancelScope(shield=True):
                    try:
                        await self.replies.set(CANCEL + reply, 1, ex=300)
                        await self.replies.delete(REPLY + reply)
                    except TRANSIENT:  # the worker stops at its stall limit
                        pass


def task_fingerprint(rec: dict[str, Any], default: str) -> str:
    """The configuration a task's weights belong to (records from before fingerprints: the API's)."""
    return rec.get("fingerprint") or default
