"""Per-tenant quotas and rate limits, one mechanism for all: what one tenant may hold or spend,
so that one tenant's flood never stalls another's requests. Beyond a quota: `OverQuota`, a 429
naming the limit (with Retry-After when waiting helps), or a 413 for something larger than a
limit could ever hold (app/errors.py).

Every count lives in the records Redis, so every API process counts against the same quota:
- calls in flight (/predict, /v1 completions, event streams): slots, leases in one sorted set per
  kind and tenant (request id -> expiry); a request gives its slot back on the way out, and the
  slot of a process that died expires with its lease;
- requests per minute: a sliding log, one sorted set per tenant (request id -> time);
- tasks held: the tenant's task index (the record store refuses a task over the count atomically);
- bytes of stored weights: charged by the worker when it stores them (contract/store.py `charge`);
- adaptation seconds per hour: the worker adds each run's seconds to its minute's counter.
`usage` reads them all for GET /usage.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import redis
import redis.asyncio
from tenacity import retry, retry_if_exception_type, stop_after_attempt

from contract.store import SLOTS, Store, now, retrying
from model.settings import Settings

RATE = "ms:rate:"  # + tenant -> zset of request ids by time (the last minute's requests)

once_more = retry(retry=retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)), stop=stop_after_attempt(2),
                  reraise=True)

# Drop expired leases, then take one if fewer than the limit are held. KEYS: the set.
# ARGV: now, limit, the lease's expiry, its id, the set's own TTL.
_TAKE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""
# A sliding log: drop what is older than the window, then log this request if fewer than the limit
# are in it. KEYS: the log. ARGV: now, window, limit, request id. Returns {1, n} when logged (n in
# the window now), {0, oldest} when over the limit (the oldest entry's time, as a string).
_HIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1] - ARGV[2])
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[3]) then
  return {0, redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]}
end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('EXPIRE', KEYS[1], math.ceil(ARGV[2]) + 1)
return {1, n + 1}
"""
WINDOW_S = 60.0  # requests per minute: a sliding minute
HOUR_S = 3600.0


class OverQuota(Exception):
    """retry_after_s None: waiting does not help (the tenant must free something first).
    status 413: the thing asked for is larger than the limit itself, so freeing room cannot help either."""

    def __init__(self, detail: str, retry_after_s: int | None = 1, status: int = 429):
        super().__init__(detail)
        self.detail, self.retry_after_s, self.status = detail, retry_after_s, status


def check_weights(store: Store, tenant: str, space: str, limit: int, more: int | None = None) -> None:
    """A new adaptation (or an import of `more` bytes) needs room under the tenant's stored-weights
    quota, for weights the size of the last ones stored in its space. The worker enforces the quota
    exactly, when it stores them; this refuses early what it would refuse."""
    used, more = store.usage(tenant, "weights_bytes"), store.weights_size(space) if more is None else more
    if more > limit:
        raise OverQuota(f"a task in space {space} holds about {more} bytes of weights; the limit on a tenant's stored "
                        f"weights is {limit} (max_weights_bytes)", retry_after_s=None, status=413)
    if used + more > limit:
        raise OverQuota(f"this tenant's tasks hold {used} bytes of adapted weights and a task in space {space} adds "
                        f"about {more}; the limit is {limit} (max_weights_bytes): delete tasks (DELETE /tasks/{{id}}) "
                        "to make room", retry_after_s=None)


def too_many_tasks(limit: int) -> OverQuota:
    return OverQuota(f"this tenant holds {limit} tasks; the limit is {limit} (max_tasks): delete tasks "
                     "(DELETE /tasks/{id}) to make room", retry_after_s=None)


def adapt_seconds_retry(spent: list[tuple[float, float]], limit: float, t: float) -> int | None:
    """Seconds until the tenant's adaptation seconds in the last hour are under `limit` again
    (None: they are now), from (minute's start, seconds) oldest first: the window is the last 60
    minutes, this one included, so a minute leaves it an hour after it began."""
    used = sum(v for _, v in spent)
    for start, v in spent:
        if used < limit:
            break
        used -= v
        wait = start + HOUR_S - t
        if used < limit:
            return max(1, int(wait + 0.999))
    return None if used < limit else int(HOUR_S)


def check_adapt_seconds(store: Store, tenant: str, limit: float) -> None:
    """A new adaptation waits while the tenant's runs took `limit` worker seconds in the last hour."""
    spent = store.adapt_seconds(tenant)
    wait = adapt_seconds_retry(spent, limit, now())
    if wait is not None:
        raise OverQuota(f"this tenant's adaptations took {sum(v for _, v in spent):.1f} worker seconds in the last "
                        f"hour; the limit is {limit:g} (max_adapt_seconds_per_hour): retry in {wait} s", retry_after_s=wait)


class Quotas:
    """Slots on the event loop (redis.asyncio): a refused call costs one Redis round trip and no
    thread, so a flood of refusals leaves the loop free for everyone else."""

    def __init__(self, r: redis.asyncio.Redis):
        self.r = r
        self._take = r.register_script(_TAKE)
        self._hit = r.register_script(_HIT)

    @once_more
    async def take(self, tenant: str, kind: str, limit: int, lease_s: float) -> str | None:
        """A lease on one of the tenant's `limit` slots of this kind, or None when all are held.
        Tried twice, at once (a pooled connection gone stale with a Redis restart), not with backoff:
        with Redis away, a flood of callers retrying inside the API is a storm on its event loop
        (/healthz took 1.3 s in bench/chaos.py); they get a 503 with Retry-After and retry from there."""
        lease, t = uuid.uuid4().hex, now()
        ok = await self._take(keys=[f"{SLOTS}{kind}:{tenant}"], args=[t, limit, t + lease_s, lease, int(lease_s) + 60])
        return lease if ok else None

    @retrying
    async def give_back(self, tenant: str, kind: str, lease: str) -> None:
        await self.r.zrem(f"{SLOTS}{kind}:{tenant}", lease)

    @asynccontextmanager
    async def slot(self, tenant: str, kind: str, limit: int, lease_s: float, what: str, setting: str) -> AsyncIterator[None]:
        """Hold one of the tenant's slots for the block; OverQuota when all `limit` are held."""
        lease = await self.take(tenant, kind, limit, lease_s)
        if lease is None:
            raise OverQuota(f"{limit} {what} of this tenant are in flight; the limit is {limit} ({setting}): retry when "
                            "one is done")
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self.give_back(tenant, kind, lease)

    @once_more
    async def hit(self, tenant: str, limit: int) -> None:
        """Log one request of the tenant; OverQuota when `limit` were made in the last minute."""
        t = now()
        logged, n = await self._hit(keys=[RATE + tenant], args=[t, WINDOW_S, limit, uuid.uuid4().hex])
        if not logged:
            wait = max(1, int(float(n) + WINDOW_S - t + 0.999))
            raise OverQuota(f"this tenant made {limit} requests in the last minute; the limit is {limit} "
                            f"(max_requests_per_minute): retry in {wait} s", retry_after_s=wait)

    async def held(self, tenant: str, kind: str) -> int:
        """Slots of this kind the tenant holds now (leases not expired)."""
        return int(await self.r.zcount(f"{SLOTS}{kind}:{tenant}", now(), "+inf"))

    async def usage(self, store: Store, tenant: str, s: Settings) -> dict[str, dict[str, float | int | None]]:
        """The tenant's use of every quota, against its limit."""
        t = now()
        requests = int(await self.r.zcount(RATE + tenant, t - WINDOW_S, "+inf"))
        tasks, weights, spent = await anyio.to_thread.run_sync(
            lambda: (store.count_tasks(tenant), store.usage(tenant, "weights_bytes"), store.adapt_seconds(tenant)))
        seconds = sum(v for _, v in spent)
        return {
            "requests_per_minute": {"used": requests, "limit": s.max_requests_per_minute},
            "tasks": {"used": tasks, "limit": s.max_tasks},
            "weights_bytes": {"used": weights, "limit": s.max_weights_bytes},
            "adapt_seconds_per_hour": {"used": round(seconds, 3), "limit": s.max_adapt_seconds_per_hour,
                                       "retry_after_s": adapt_seconds_retry(spent, s.max_adapt_seconds_per_hour, t)},
            "waiting_predicts": {"used": await self.held(tenant, "predict"), "limit": s.max_waiting_predicts},
            "event_streams": {"used": await self.held(tenant, "events"), "limit": s.max_event_streams},
        }
