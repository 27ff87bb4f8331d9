"""Per-tenant quotas: what one tenant may hold at once, so that one tenant's flood never stalls
another's requests. Beyond a quota: `OverQuota`, a 429 with Retry-After (app/errors.py).

Slots are leases in the records Redis, one sorted set per kind and tenant (request id -> expiry):
every API process counts against the same quota, a request gives its slot back on the way out,
and the slot of a process that died expires with its lease.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import redis
import redis.asyncio
from tenacity import retry, retry_if_exception_type, stop_after_attempt

from worker.store import SLOTS, Store, now, retrying

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


class OverQuota(Exception):
    """retry_after_s None: waiting does not help (the tenant must free something first)."""

    def __init__(self, detail: str, retry_after_s: int | None = 1):
        super().__init__(detail)
        self.detail, self.retry_after_s = detail, retry_after_s


def check_weights(store: Store, tenant: str, mode: str, limit: int) -> None:
    """A new adaptation needs room under the tenant's stored-weights quota for weights the size of
    the last ones stored in its mode. The worker enforces the quota exactly, when it stores them;
    this refuses early what it would refuse."""
    used, more = store.usage(tenant, "weights_bytes"), store.weights_size(mode)
    if used + more > limit:
        raise OverQuota(f"this tenant's tasks hold {used} bytes of adapted weights and a task in mode {mode} adds "
                        f"about {more}; the limit is {limit}: delete tasks (DELETE /tasks/{{id}}) to make room",
                        retry_after_s=None)


class Quotas:
    """Slots on the event loop (redis.asyncio): a refused call costs one Redis round trip and no
    thread, so a flood of refusals leaves the loop free for everyone else."""

    def __init__(self, r: redis.asyncio.Redis):
        self.r = r
        self._take = r.register_script(_TAKE)

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
    async def slot(self, tenant: str, kind: str, limit: int, lease_s: float, what: str) -> AsyncIterator[None]:
        """Hold one of the tenant's slots for the block; OverQuota when all `limit` are held."""
        lease = await self.take(tenant, kind, limit, lease_s)
        if lease is None:
            raise OverQuota(f"{limit} {what} of this tenant are in flight; the limit is {limit}: retry when one is done")
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self.give_back(tenant, kind, lease)
