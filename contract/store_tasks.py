"""The task and job records (hashes, indexed by tenant and creation time; the pending index the
reaper reads): created atomically, updated only while they exist and hold the expected run."""

from __future__ import annotations

import json
from typing import Any

from contract.store_io import decode, flat, now, retrying, strs
from contract.store_keys import JOB, JOBS, PENDING, TASK, TENANT

# Create a task record unless one exists: atomic, so two identical requests make one task, and
# two concurrent new ones cannot take a tenant past its number of tasks (-1: over it).
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
if redis.call('HGET', KEYS[1], 'status') == '"queued"' then redis.call('ZADD', KEYS[3], ARGV[1], ARGV[2]) end
return 1
"""
# Update a record only while it exists: a worker finishing late never resurrects a deleted task.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""
# Update a task record only while it exists and holds the expected values (its run id, above all:
# a run that was superseded, or whose task was deleted and posted again, writes nothing), count
# an attempt or a completion in the same step, and keep the pending index in line with the status.
# KEYS: record, pending index. ARGV: id, time, n, n (field, expected JSON) pairs, the field to
# increment ('' for none), then the field/value pairs to set.
_SET_IF = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[3])
for i = 1, n do
  if (redis.call('HGET', KEYS[1], ARGV[2 + 2 * i]) or 'null') ~= ARGV[3 + 2 * i] then return 0 end
end
local k = 4 + 2 * n
if ARGV[k] ~= '' then redis.call('HINCRBY', KEYS[1], ARGV[k], 1) end
if #ARGV > k then redis.call('HSET', KEYS[1], unpack(ARGV, k + 1)) end
local s = redis.call('HGET', KEYS[1], 'status')
if s == '"queued"' or s == '"adapting"' then redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
else redis.call('ZREM', KEYS[2], ARGV[1]) end
return 1
"""


class TaskRecords:
    """Store's part for tasks and jobs (self.r, and the scripts Store registers)."""

    # --- tasks
    @retrying
    def create_task(self, task_id: str, tenant: str, fields: dict[str, Any], max_tasks: int | None = None) -> bool | None:
        """True: created; False: a record with this id exists; None: the tenant holds max_tasks already."""
        created = now()
        got = int(self._create(
            keys=[TASK + task_id, TENANT + tenant, PENDING],
            args=[created, task_id, max_tasks if max_tasks is not None else 2**53,
                  *flat({"id": task_id, "tenant": tenant, "created_at": created, **fields})],
        ))
        return None if got < 0 else bool(got)

    # one record (task or job hash): read it; update fields only while it exists
    @retrying
    def _get(self, key: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(key)
        return decode(raw) if raw else None

    @retrying
    def _set(self, key: str, fields: dict[str, Any]) -> bool:
        return bool(self._update(keys=[key], args=flat(fields)))

    def task(self, task_id: str) -> dict[str, Any] | None:
        return self._get(TASK + task_id)

    @retrying
    def set_task_if(self, task_id: str, expect: dict[str, Any], fields: dict[str, Any], incr: str | None = None) -> bool:
        """Set fields (and add 1 to the counter incr) only while the record exists and its fields
        equal expect (a missing field equals None); True when it did."""
        cond = [x for f, v in strs(expect).items() for x in (f, v)]
        return bool(self._set_if(keys=[TASK + task_id, PENDING],
                                 args=[task_id, now(), len(expect), *cond, incr or "", *flat(fields)]))

    def update_task(self, task_id: str, run: str | None = None, **fields: Any) -> bool:
        """Set fields while the record exists and, given a run id, while that run is still the task's."""
        return self.set_task_if(task_id, {} if run is None else {"run": run}, fields)

    def finish_task(self, task_id: str, run: str | None, **fields: Any) -> bool:
        """status=ready plus fields, and completions + 1, only while the run is the task's."""
        return self.set_task_if(task_id, {"run": run}, {"status": "ready", **fields}, incr="completions")

    def claim_task(self, task_id: str, run: str | None, worker: str, previous: str | None, **fields: Any) -> bool:
        """The worker process takes the run (status adapting, attempts + 1) unless the task moved on
        to another run or another process claimed it since the caller read `previous`."""
        return self.set_task_if(task_id, {"run": run, "worker": previous},
                                {"status": "adapting", "worker": worker, **fields}, incr="attempts")

    def requeue_task(self, task_id: str, expect: dict[str, Any], run: str) -> bool:
        """Give the task a new run, queued and not yet enqueued, if its fields still equal expect:
        whatever the old run writes from then on is ignored."""
        return self.set_task_if(task_id, expect, {"status": "queued", "run": run, "worker": None, "enqueued": False,
                                                  "queued_at": now(), "error": None, "step": 0})

    @retrying
    def statuses(self, task_ids: list[str]) -> list[str | None]:
        """Each task's status (None when it is gone), in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for i in task_ids:
            pipe.hget(TASK + i, "status")
        return [None if v is None else json.loads(v) for v in pipe.execute()]

    @retrying
    def pending_tasks(self) -> list[str]:
        return self.r.zrange(PENDING, 0, -1)

    @retrying
    def forget_pending(self, task_id: str) -> None:
        self.r.zrem(PENDING, task_id)

    @retrying
    def list_tasks(self, tenant: str, offset: int, limit: int, status: set[str] | None = None) -> tuple[list[dict[str, Any]], int]:
        """A page of the tenant's tasks, newest first, and how many there are; with `status`, of
        those in these statuses (the statuses of all its tasks are read: a tenant holds max_tasks at most)."""
        if not status:
            return self._records(TASK, self.r.zrevrange(TENANT + tenant, offset, offset + limit - 1)), \
                int(self.r.zcard(TENANT + tenant))
        ids = self.r.zrevrange(TENANT + tenant, 0, -1)
        kept = [i for i, st in zip(ids, self.statuses(ids)) if st in status]
        return self._records(TASK, kept[offset: offset + limit]), len(kept)

    def _records(self, prefix: str, ids: list[str]) -> list[dict[str, Any]]:
        pipe = self.r.pipeline()
        for i in ids:
            pipe.hgetall(prefix + i)
        return [decode(raw) for raw in pipe.execute() if raw]

    @retrying
    def count_tasks(self, tenant: str) -> int:
        return int(self.r.zcard(TENANT + tenant))

    @retrying
    def delete_task(self, task_id: str, tenant: str) -> bool:
        """Delete the record; True for the one caller that deleted it, whose the tenant's usage is
        then less the record's weights."""
        held, deleted, *_ = (self.r.pipeline().hget(TASK + task_id, "weights_bytes").delete(TASK + task_id)
                             .zrem(TENANT + tenant, task_id).zrem(PENDING, task_id).execute())
        if deleted and held:
            self.refund(tenant, "weights_bytes", int(held))
        return bool(deleted)

    # --- meta-training jobs
    @retrying
    def create_job(self, job_id: str, fields: dict[str, Any]) -> None:
        created = now()
        mapping = strs({"id": job_id, "created_at": created, **fields})
        self.r.pipeline().hset(JOB + job_id, mapping=mapping).zadd(JOBS, {job_id: created}).execute()

    def job(self, job_id: str) -> dict[str, Any] | None:
        return self._get(JOB + job_id)

    @retrying
    def list_jobs(self, offset: int, limit: int, state: set[str] | None = None) -> tuple[list[dict[str, Any]], int]:
        """A page of the meta-training jobs, newest first, and how many there are (in these states)."""
        jobs = self._records(JOB, self.r.zrevrange(JOBS, 0, -1))  # a few runs a day: reading all is cheap
        kept = [j for j in jobs if not state or j.get("state") in state]
        return kept[offset: offset + limit], len(kept)

    def update_job(self, job_id: str, **fields: Any) -> bool:
        return self._set(JOB + job_id, fields)
