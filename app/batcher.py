"""Concurrent /predict calls on the same task become one worker call, one batched forward pass.

Per task, one batch is in flight at a time (per API process); calls that arrive meanwhile
join the next batch (up to max_inputs inputs), which goes as soon as the worker answers the
one before. So batches grow with the load by themselves, and the model reads its weights once
per batch instead of once per call. An idle task's first call waits `linger` for company.
The worker answers each call of a batch separately: one call's bad input fails only that call.
Everything runs on the event loop: a waiting call holds no thread.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, status

from app.worker_calls import worker_error


@dataclass
class Batch:
    groups: list[list[dict[str, Any]]] = field(default_factory=list)
    n: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    replies: list[dict[str, Any]] | None = None
    error: BaseException | None = None


class Batcher:
    def __init__(self, send: Callable[[str, list], Awaitable[list]], linger_s: float, max_inputs: int):
        self.send = send  # async (task_id, groups) -> one reply per group
        self.linger = linger_s
        self.max = max_inputs
        self.lines: dict[str, deque[Batch]] = {}  # per task: batches not sent yet, oldest first
        self.busy: set[str] = set()  # tasks with a batch in flight
        self.turn: asyncio.Condition | None = None  # made on the event loop, at first use

    async def __call__(self, task_id: str, queries: list[dict[str, Any]]) -> dict[str, Any]:
        # Between two awaits nothing else runs: the lines need no lock.
        self.turn = self.turn or asyncio.Condition()
        line = self.lines.setdefault(task_id, deque())
        leader = not line or line[-1].n + len(queries) > self.max
        if leader:
            line.append(Batch())
        b = line[-1]
        b.groups.append(queries)
        b.n += len(queries)
        i = len(b.groups) - 1
        if leader:
            await self._lead(task_id, line, b)
        else:
            await b.done.wait()
        if b.error is not None:
            raise b.error
        reply = b.replies[i]
        if "status" in reply:
            raise worker_error(reply)
        return reply

    async def _lead(self, task_id: str, line: deque[Batch], b: Batch) -> None:
        if line[0] is b and task_id not in self.busy:
            await asyncio.sleep(self.linger)  # idle: give concurrent calls a moment to join
        async with self.turn:
            await self.turn.wait_for(lambda: line[0] is b and task_id not in self.busy)
        line.popleft()
        if not line:
            del self.lines[task_id]
        self.busy.add(task_id)
        try:
            b.replies = await self.send(task_id, b.groups)
        except Exception as e:  # every call of the batch gets the same error
            b.error = e
        except asyncio.CancelledError:
            b.error = HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the call was cancelled; retry",
                                    headers={"Retry-After": "1"})
            raise
        finally:
            self.busy.discard(task_id)
            b.done.set()
            async with self.turn:
                self.turn.notify_all()
