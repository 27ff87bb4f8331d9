"""How the worker's work ends short: a Redis restart waited out (TRANSIENT, patient), a time limit
(soft_limit), a record deleted or superseded while the worker was on it (Gone)."""

from __future__ import annotations

import redis
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

TRANSIENT = (redis.ConnectionError, redis.TimeoutError)  # a Redis restarting: wait, or leave the run to the reaper
# Writes that end an adaptation wait out a Redis restart: the run they save cost minutes.
patient = retry(retry=retry_if_exception_type(TRANSIENT), stop=stop_after_delay(60),
                wait=wait_exponential(multiplier=0.2, max=5), reraise=True)


class Gone(Exception):
    """The task record was deleted, or its run superseded, while the worker was on it."""


def soft_limit(hard: int) -> int:
    # The soft limit lands between two steps (a step of a big model can take a while) and marks
    # the record failed; the hard limit's kill would leave it "adapting".
    return max(1, hard - max(30, hard // 10))
