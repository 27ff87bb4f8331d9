"""Task and job records in the broker's Redis (AOF on, noeviction): shared by app/ and worker/.

A task record is a hash holding the request (its demonstrations by key: contract/demos.py), its
status and its progress; its id is derived from the tenant, the request's content and the service's
configuration fingerprint (contract/config.py), so the same request from the same tenant finds the
same record. Weights are blobs (contract/blobs.py), never files: adapted ones (LoRA and full mode)
in the cache Redis under a key with the fingerprint (they may be evicted: adapted again),
imported adapters beside the records (nothing could make them again). A record holds the key.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import redis
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

TASK = "ms:task:"  # + id -> hash
TENANT = "ms:tenant:"  # + tenant -> zset of task ids by creation time
JOB = "ms:job:"  # + id -> hash
JOBS = "ms:jobs"  # zset of job ids by creation time
ACTIVE = "ms:checkpoint:active"  # the checkpoint new tasks start from by default
SHIPPED = "ms:checkpoint:shipped"  # JSON: the shipped checkpoint a worker last installed or refused, and why
METRICS = "ms:metrics:"  # + worker -> hash: counters that worker adds to and /metrics reads
METRIC_WORKERS = "ms:metrics"  # set: the workers with counters
REPLY = "ms:reply:"  # + uuid -> list the worker pushes a prediction reply onto
WORKERS = "ms:workers"  # hash: process -> its model, the run it is on and its last heartbeat
USAGE = "ms:usage:"  # + tenant -> hash: weights_bytes, what the tenant's tasks hold
SIZES = "ms:weights_size"  # hash: mode -> bytes of the last weights stored in that mode (the API's estimate)
SLOTS = "ms:slots:"  # + kind:tenant -> zset of leases (request id -> expiry): app/quotas.py
PENDING = "ms:pending"  # zset: ids of queued or adapting tasks (what the reaper looks at), by last change
ADAPT_S = "ms:adapt_s:"  # + tenant:minute -> adaptation seconds the tenant's runs took in that minute (expire in 1 h)
IDEM = "ms:idem:"  # + scope:key -> the first answer to a request with that Idempotency-Key
CANCEL = "ms:cancel:"  # + reply -> set when the caller of a streamed generation went away
TAKEN = "ms:taken:"  # + reply -> the worker process that took the call (the API watches its heartbeat)

BASE = "base"  # the checkpoint id of the base model (no meta-training)
FORGET_S = 600  # a worker process silent this long is dropped from the heartbeats
ADAPT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)

# Redis blips (restart, failover) should not fail a request or a finished adaptation.
retrying = retry(
    retry=retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
    stop=stop_after_attempt(5),
    wait=wait_exponential(multiplier=0.1, max=2),
    reraise=True,
)

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


# Add n to a tenant's usage unless that takes it over the limit: -1 then, else the new usage.
_CHARGE = """
local used = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if used + tonumber(ARGV[2]) > tonumber(ARGV[3]) then return -1 end
return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
"""


def now() -> float:
    return time.time()


def content_hash(tenant: str, payload: dict[str, Any]) -> str:
    """sha256 of the tenant and the canonical JSON of what determines the adapted weights."""
    blob = json.dumps({"tenant": tenant, **payload}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def weights_key(fingerprint: str, checkpoint: str, digest: str) -> str:
    """The blob key of adapted weights: one per configuration, starting point and task content."""
    return f"weights/{fingerprint}/{checkpoint}/{digest}"


def imported_key(digest: str) -> str:
    return f"imported/{digest}"


def task_weights_key(rec: dict[str, Any]) -> str:
    """The key of the task's weights: the record's own (imported adapters), else its adapted weights'."""
    return rec.get("weights_key") or weights_key(rec.get("fingerprint") or "", rec["checkpoint"], rec["hash"])


def _strs(fields: dict[str, Any]) -> dict[str, str]:
    """Hash fields as JSON text, strings too, so _decode gives back exactly what was stored."""
    return {k: json.dumps(v) for k, v in fields.items()}


def _flat(fields: dict[str, Any]) -> list[str]:
    return [x for kv in _strs(fields).items() for x in kv]


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in raw.items()}


class Store:
    def __init__(self, r: redis.Redis, label: str = ""):
        self.r = r
        self.label = label  # the worker whose counters this process adds to (/metrics' worker label)
        self._create = r.register_script(_CREATE)
        self._update = r.register_script(_UPDATE)
        self._set_if = r.register_script(_SET_IF)
        self._charge = r.register_script(_CHARGE)

    @classmethod
    def from_url(cls, url: str, label: str = "") -> Store:
        return cls(redis.Redis.from_url(url, decode_responses=True, health_check_interval=30), label)

    # --- tasks
    @retrying
    def create_task(self, task_id: str, tenant: str, fields: dict[str, Any], max_tasks: int | None = None) -> bool | None:
        """True: created; False: a record with this id exists; None: the tenant holds max_tasks already."""
        created = now()
        got = int(self._create(
            keys=[TASK + task_id, TENANT + tenant, PENDING],
            args=[created, task_id, max_tasks if max_tasks is not None else 2**53,
                  *_flat({"id": task_id, "tenant": tenant, "created_at": created, **fields})],
        ))
        return None if got < 0 else bool(got)

    # one record (task or job hash): read it; update fields only while it exists
    @retrying
    def _get(self, key: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(key)
        return _decode(raw) if raw else None

    @retrying
    def _set(self, key: str, fields: dict[str, Any]) -> bool:
        return bool(self._update(keys=[key], args=_flat(fields)))

    def task(self, task_id: str) -> dict[str, Any] | None:
        return self._get(TASK + task_id)

    @retrying
    def set_task_if(self, task_id: str, expect: dict[str, Any], fields: dict[str, Any], incr: str | None = None) -> bool:
        """Set fields (and add 1 to the counter incr) only while the record exists and its fields
        equal expect (a missing field equals None); True when it did."""
        cond = [x for f, v in _strs(expect).items() for x in (f, v)]
        return bool(self._set_if(keys=[TASK + task_id, PENDING],
                                 args=[task_id, now(), len(expect), *cond, incr or "", *_flat(fields)]))

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
        return [_decode(raw) for raw in pipe.execute() if raw]

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

    # --- what a tenant holds (app/quotas.py reads it, the worker charges it)
    @retrying
    def charge(self, tenant: str, what: str, n: int, limit: int) -> int | None:
        """Add n to the tenant's usage of `what`; None (and nothing added) when that would exceed limit."""
        used = int(self._charge(keys=[USAGE + tenant], args=[what, n, limit]))
        return None if used < 0 else used

    @retrying
    def note_weights_size(self, mode: str, n: int) -> None:
        self.r.hset(SIZES, mode, n)

    @retrying
    def weights_size(self, mode: str) -> int:
        """Bytes a task's weights take in this mode, as last stored (0 before any)."""
        return int(self.r.hget(SIZES, mode) or 0)

    @retrying
    def refund(self, tenant: str, what: str, n: int) -> None:
        self.r.hincrby(USAGE + tenant, what, -n)

    @retrying
    def usage(self, tenant: str, what: str) -> int:
        return int(self.r.hget(USAGE + tenant, what) or 0)

    @retrying
    def add_adapt_seconds(self, tenant: str, seconds: float) -> None:
        """Count a run's worker seconds in the minute it ended (kept an hour: app/quotas.py sums them)."""
        key = f"{ADAPT_S}{tenant}:{int(now() // 60)}"
        self.r.pipeline().incrbyfloat(key, seconds).expire(key, 3660).execute()

    @retrying
    def adapt_seconds(self, tenant: str) -> list[tuple[float, float]]:
        """(minute's start, seconds) of the tenant's adaptations in the last hour, oldest first."""
        minute = int(now() // 60)
        minutes = list(range(minute - 59, minute + 1))
        got = self.r.mget([f"{ADAPT_S}{tenant}:{m}" for m in minutes])
        return [(m * 60.0, float(v)) for m, v in zip(minutes, got) if v]

    # --- meta-training jobs
    @retrying
    def create_job(self, job_id: str, fields: dict[str, Any]) -> None:
        created = now()
        mapping = _strs({"id": job_id, "created_at": created, **fields})
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

    # --- the active checkpoint
    @retrying
    def active_checkpoint(self) -> str:
        return self.r.get(ACTIVE) or BASE

    @retrying
    def set_active_checkpoint(self, checkpoint: str) -> None:
        self.r.set(ACTIVE, checkpoint)

    @retrying
    def activate_first(self, checkpoint: str) -> bool:
        """Make `checkpoint` active unless one was ever chosen (an admin's choice, `base` included, stays)."""
        return bool(self.r.set(ACTIVE, checkpoint, nx=True))

    @retrying
    def deactivate(self, checkpoint: str) -> bool:
        """Back to the base model if `checkpoint` is the active one (compare and set, in one script)."""
        script = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('set', KEYS[1], ARGV[2]) end"
        return bool(self.r.eval(script, 1, ACTIVE, checkpoint, BASE))

    @retrying
    def note_shipped(self, info: dict[str, Any]) -> None:
        self.r.set(SHIPPED, json.dumps(info))

    @retrying
    def shipped(self) -> dict[str, Any] | None:
        raw = self.r.get(SHIPPED)
        return json.loads(raw) if raw else None

    # --- calls the API sends to one worker: which process took it
    @retrying
    def take(self, reply: str, process: str, ttl_s: int) -> None:
        self.r.set(TAKEN + reply, process, ex=max(1, int(ttl_s)))

    # --- worker processes with the model loaded (for /readyz)
    @retrying
    def beat(self, process: str, info: dict[str, Any]) -> None:
        self.r.hset(WORKERS, process, json.dumps({**info, "at": now()}))

    @retrying
    def gone(self, process: str) -> None:
        self.r.hdel(WORKERS, process)

    @retrying
    def worker(self, process: str, max_age_s: float) -> dict[str, Any] | None:
        """The process's last heartbeat (model, and the task and run it is on), None when it is older than max_age_s."""
        raw = self.r.hget(WORKERS, process)
        info = json.loads(raw) if raw else None
        return info if info is not None and now() - info["at"] <= max_age_s else None

    def runs(self, process: str | None, run: str | None, max_age_s: float) -> bool:
        """Whether the process is alive and on this run."""
        info = self.worker(process, max_age_s) if process and run else None
        return info is not None and info.get("run") == run

    @retrying
    def live_workers(self, max_age_s: float) -> dict[str, dict[str, Any]]:
        """Processes that beat within max_age_s; entries silent for FORGET_S (killed processes) are dropped."""
        live, stale = {}, []
        for k, v in self.r.hgetall(WORKERS).items():
            info = json.loads(v)
            if now() - info["at"] <= max_age_s:
                live[k] = info
            elif now() - info["at"] > max(max_age_s, FORGET_S):
                stale.append(k)
        if stale:
            self.r.hdel(WORKERS, *stale)
        return live

    # --- metrics each worker reports under its name (read by the API's /metrics, one label per worker)
    @retrying
    def count(self, name: str, by: float = 1) -> None:
        self.r.pipeline().hincrbyfloat(METRICS + self.label, name, by).sadd(METRIC_WORKERS, self.label).execute()

    def observe_adaptation(self, seconds: float) -> None:
        key = METRICS + self.label
        pipe = self.r.pipeline().sadd(METRIC_WORKERS, self.label)
        pipe.hincrbyfloat(key, "adapt_seconds_sum", seconds).hincrby(key, "adapt_seconds_count", 1)
        for b in ADAPT_BUCKETS:
            if seconds <= b:
                pipe.hincrby(key, f"adapt_seconds_le_{b}", 1)
        retrying(pipe.execute)()

    @retrying
    def metrics(self) -> dict[str, dict[str, float]]:
        """worker -> its counters."""
        names = sorted(self.r.smembers(METRIC_WORKERS))
        pipe = self.r.pipeline()
        for w in names:
            pipe.hgetall(METRICS + w)
        return {w: {k: float(v) for k, v in got.items()} for w, got in zip(names, pipe.execute())}
