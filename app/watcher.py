"""Waiting for tasks to be ready without a thread or a Redis read per waiter.

/predict with wait_s waits here: one loop reads the status of every task somebody waits on in one
round trip per tick, and wakes that task's waiters when it is no longer queued or adapting. A
thousand callers waiting on one task cost one status read every `every_s`.
"""

from __future__ import annotations

import asyncio
import logging

import anyio.to_thread

from contract.store import Store

log = logging.getLogger(__name__)
UNDERWAY = ("queued", "adapting")


class StatusWatcher:
    def __init__(self, store: Store, every_s: float = 0.2):
        self.store, self.every = store, every_s
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.loop_task: asyncio.Task | None = None

    async def wait(self, task_id: str, timeout_s: float) -> None:
        """Return once the task is neither queued nor adapting (or is gone), or after timeout_s."""
        ev = asyncio.Event()
        self.waiters.setdefault(task_id, set()).add(ev)
        if self.loop_task is None or self.loop_task.done():
            self.loop_task = asyncio.create_task(self._watch())
        try:
            await asyncio.wait_for(ev.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            mine = self.waiters.get(task_id)
            if mine is not None:
                mine.discard(ev)
                if not mine:
                    del self.waiters[task_id]

    async def _watch(self) -> None:
        while self.waiters:
            await asyncio.sleep(self.every)
            ids = list(self.waiters)
            try:
                statuses = await anyio.to_thread.run_sync(self.store.statuses, ids)
            except Exception as e:  # Redis restarting: the waiters keep waiting, up to their own timeout
                log.warning("status watch failed: %s: %s", type(e).__name__, e)
                continue
            for task_id, st in zip(ids, statuses):
                if st not in UNDERWAY:
                    for ev in self.waiters.get(task_id, ()):
                        ev.set()
