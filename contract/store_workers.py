"""The service's shared state beside the records: the active checkpoint, the shipped one, which
process took a call, the workers' heartbeats and the counters each worker reports."""

from __future__ import annotations

import json
from typing import Any

from contract.store_io import now, retrying
from contract.store_keys import ACTIVE, BASE, METRIC_WORKERS, METRICS, SHIPPED, TAKEN, WORKERS

FORGET_S = 600  # a worker process silent this long is dropped from the heartbeats
ADAPT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class WorkerRecords:
    """Store's part for checkpoints, workers and metrics (self.r, self.label)."""

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
