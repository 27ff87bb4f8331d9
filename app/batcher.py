"""Concurrent /predict calls on the same task become one worker call, one batched forward pass.

Per task, `lanes()` batches are in flight at a time (per API process: one per live worker, so a
busy task uses every worker); calls that arrive meanwhile join the next batch (up to max_inputs
inputs), which goes as soon as a batch in flight is answered. So batches grow with the load by
themselves, and the model reads its weights once per batch instead of once per call. An idle
task's first call waits `linger` for company. The worker answers each call of a batch
separately: one call's bad input fails only that call; a batch whose worker dies is sent to
another by `send` (app/routing.py), and one that fails lets the next go at once.
Everything runs on the event loop: a waiting call holds no thread.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, status

from app.routing import worker_error


@dataclass
class Batch:
    groups: list[list[dict[str, Any]]] = field(default_factory=list)
    n: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    replies: list[dict[str, Any]] | None = None
    error: BaseException | None = None


class Batcher:
    def __init__(self, send: Callable[[str, str, list], Awaitable[list]], linger_s: float, max_inputs: int,
                 lanes: Callable[[str], int] = lambda route: 1):
        self.send = send  # async (task_id, route, groups) -> one reply per group
        self.linger = linger_s
        self.max = max_inputs
        self.lanes = lanes  # route -> batches of one task in flight at once
        self.lines: dict[str, deque[Batch]] = {}  # per task: batches not sent yet, oldest first
        self.busy: Counter[str] = Counter()  # task -> its batches in flight
        self.turn: asyncio.Condition | None = None  # made on the event loop, at first use

    async def __call__(self, task_id: str, queries: list[dict[str, Any]], route: str = "") -> dict[str, Any]:
        """The reply to these queries; `route` (the task's configuration) goes to `send` as it is."""
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
            await self._lead(task_id, route, line, b)
        else:
            await b.done.wait()
        if b.error is not None:
            raise b.error
        reply = b.replies[i]
        if "status" in reply:
            raise worker_error(reply)
        return reply

    async def _lead(self, task_id: str, route: str, line: deque[Batch], b: Batch) -> None:
        if line[0] is b and not self.busy[task_id]:
            await asyncio.sleep(self.linger)  # idle: give concurrent calls a moment to join
        async with self.turn:
            await self.turn.wait_for(lambda: line[0] is b and self.busy[task_id] < self.lanes(route))
        line.popleft()
        if not line:
            del self.lines[task_id]
        self.busy[task_id] += 1
        try:
            b.replies = await self.send(task_id, route, b.groups)
        except Exception as e:  # every call of the batch gets the same error
            b.error = e
        except asyncio.CancelledError:
            b.error = HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the call was cancelled; retry",
                                    headers={"Retry-After": "1"})
            raise
        finally:
            self.busy[task_id] -= 1
            if not self.busy[task_id]:
                del self.busy[task_id]
            b.done.set()
            async with self.turn:
                self.turn.notify_all()
