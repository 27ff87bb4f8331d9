"""How the records store talks to Redis: retries over blips, the clock records are stamped with,
and hash fields as JSON text."""

from __future__ import annotations

import json
import time
from typing import Any

import redis
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential

# Redis blips (restart, failover) should not fail a request or a finished adaptation.
retrying = retry(
    retry=retry_if_exception_type((redis.ConnectionError, redis.TimeoutError)),
    stop=stop_after_attempt(5),
    wait=wait_exponential(multiplier=0.1, max=2),
    reraise=True,
)


def now() -> float:
    return time.time()


def strs(fields: dict[str, Any]) -> dict[str, str]:
    """Hash fields as JSON text, strings too, so decode gives back exactly what was stored."""
    return {k: json.dumps(v) for k, v in fields.items()}


def flat(fields: dict[str, Any]) -> list[str]:
    return [x for kv in strs(fields).items() for x in kv]


def decode(raw: dict[str, str]) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in raw.items()}
