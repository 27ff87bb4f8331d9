"""The records store's Redis key names, and the ids and blob keys derived from a request: a task's
content hash, its adapted or imported weights' key."""

from __future__ import annotations

import hashlib
import json
from typing import Any

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
