"""Concurrent /predict calls on the same task become one worker call, one batched forward pass.

Per task, one batch is in flight at a time (per API process); calls that arrive meanwhile
join the next batch (up to max_inputs inputs), which goes as soon as the worker answers the
one before. So batches grow with the load by themselves, and the model reads its weights once
per batch instead of once per call. An idle task's first call waits `linger` for company.
The worker answers each call of a batch separately: one call's bad input fails only that call.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException


@dataclass
class Batch:
    groups: list[list[dict[str, Any]]] = field(default_factory=list)
    n: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    replies: list[dict[str, Any]] | None = None
    error: BaseException | None = None


class Batcher:
    def __init__(self, send, linger_s: float, max_inputs: int):
        self.send = send  # (task_id, groups) -> one reply per group
        self.linger = linger_s
        self.max = max_inputs
        self.cond = threading.Condition()
        self.lines: dict[str, deque[Batch]] = {}  # per task: batches not sent yet, oldest first
        self.busy: set[str] = set()  # tasks with a batch in flight

    def __call__(self, task_id: str, queries: list[dict[str, Any]]) -> dict[str, Any]:
        with self.cond:
            line = self.lines.setdefault(task_id, deque())
            leader = not line or line[-1].n + len(queries) > self.max
            if leader:
                line.append(Batch())
            b = line[-1]
            b.groups.append(queries)
            b.n += len(queries)
            i = len(b.groups) - 1
            if leader:
                waited = False
                while line[0] is not b or task_id in self.busy:
                    waited = True
                    self.cond.wait()
                if not waited:  # idle: give concurrent calls a moment to join
                    end = time.monotonic() + self.linger
                    while (left := end - time.monotonic()) > 0:
                        self.cond.wait(left)
                line.popleft()
                if not line:
                    del self.lines[task_id]
                self.busy.add(task_id)
        if leader:
            try:
                b.replies = self.send(task_id, b.groups)
            except BaseException as e:  # every call of the batch gets the same error
                b.error = e
            finally:
                with self.cond:
                    self.busy.discard(task_id)
                    self.cond.notify_all()
                b.done.set()
        else:
            b.done.wait()
        if b.error is not None:
            raise b.error
        reply = b.replies[i]
        if "status" in reply:
            raise HTTPException(reply["status"], reply["error"])
        return reply
