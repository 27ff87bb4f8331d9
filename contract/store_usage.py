"""What a tenant holds and spends, in the records Redis: bytes of weights (charged against a limit,
refunded on delete), the last weights' size per mode, adaptation seconds by minute."""

from __future__ import annotations

from contract.store_io import now, retrying
from contract.store_keys import ADAPT_S, SIZES, USAGE

# Add n to a tenant's usage unless that takes it over the limit: -1 then, else the new usage.
_CHARGE = """
local used = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if used + tonumber(ARGV[2]) > tonumber(ARGV[3]) then return -1 end
return redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
"""


class UsageRecords:
    """Store's part for tenants' usage (self.r, and the script Store registers)."""

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
