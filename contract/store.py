"""Task and job records in the broker's Redis (AOF on, noeviction): shared by app/ and worker/.

A task record is a hash holding the request (its demonstrations by key: contract/demos.py), its
status and its progress; its id is derived from the tenant, the request's content and the service's
configuration fingerprint (contract/config.py), so the same request from the same tenant finds the
same record. Weights are blobs (contract/blobs.py), never files: adapted ones (LoRA and full mode)
in the cache Redis under a key with the fingerprint (they may be evicted: adapted again),
imported adapters beside the records (nothing could make them again). A record holds the key.

Store joins the parts: store_tasks.py (task and job records), store_usage.py (what a tenant holds),
store_workers.py (checkpoints, heartbeats, metrics); store_keys.py names the keys, store_io.py
retries and encodes. Importers take every name from here.
"""

from __future__ import annotations

import redis

from contract.store_io import now, retrying
from contract.store_keys import (ACTIVE, ADAPT_S, BASE, CANCEL, IDEM, JOB, JOBS, METRIC_WORKERS, METRICS, PENDING,
                                 REPLY, SHIPPED, SIZES, SLOTS, TAKEN, TASK, TENANT, USAGE, WORKERS, content_hash,
                                 imported_key, task_weights_key, weights_key)
from contract.store_tasks import _CREATE, _SET_IF, _UPDATE, TaskRecords
from contract.store_usage import _CHARGE, UsageRecords
from contract.store_workers import ADAPT_BUCKETS, FORGET_S, WorkerRecords

__all__ = ["ACTIVE", "ADAPT_BUCKETS", "ADAPT_S", "BASE", "CANCEL", "FORGET_S", "IDEM", "JOB", "JOBS", "METRIC_WORKERS",
           "METRICS", "PENDING", "REPLY", "SHIPPED", "SIZES", "SLOTS", "TAKEN", "TASK", "TENANT", "USAGE", "WORKERS",
           "Store", "content_hash", "imported_key", "now", "retrying", "task_weights_key", "weights_key"]


class Store(TaskRecords, UsageRecords, WorkerRecords):
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
