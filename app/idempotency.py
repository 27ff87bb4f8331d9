"""Idempotency-Key: a retried POST gets the first answer instead of doing the work twice.

The first request with a key claims it (SET NX, as pending) with the hash of its body; when it
succeeds, its answer (status, body, Location) replaces the claim for idempotency_ttl_s. The same
key again with the same body gets that answer; with another body, or while the first is still
running, a 409 that says which. A request that fails lets the key go, so a retry can succeed.
Keys are per tenant (admin calls have their own scope).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Header, HTTPException, status

from contract.store import IDEM, Store, retrying

Answer = tuple[int, dict[str, Any], dict[str, str]]  # status, JSON body, headers to repeat
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255,
                                              pattern=r"^[\x21-\x7e]+$",
                                              description="the same key with the same body gets the first answer again")]


def body_hash(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@retrying
def _claim(store: Store, key: str, digest: str, ttl_s: int) -> dict[str, Any] | None:
    """None when this request claimed the key, else what the key holds."""
    if store.r.set(key, json.dumps({"hash": digest, "pending": True}), nx=True, ex=ttl_s):
        return None
    held = store.r.get(key)
    return json.loads(held) if held else {"hash": digest, "pending": True}


def once(store: Store, scope: str, key: str | None, body: Any, ttl_s: int, run: Callable[[], Answer]) -> Answer:
    """run()'s answer, or the answer the first request with this key got."""
    if key is None:
        return run()
    digest, rkey = body_hash(body), f"{IDEM}{scope}:{key}"
    held = _claim(store, rkey, digest, ttl_s)
    if held is not None:
        if held["hash"] != digest:
            raise HTTPException(status.HTTP_409_CONFLICT, f"Idempotency-Key {key!r} was used with another body: use a "
                                "new key for a new request")
        if held.get("pending"):
            raise HTTPException(status.HTTP_409_CONFLICT, f"a request with Idempotency-Key {key!r} is in progress; "
                                "retry to get its answer", headers={"Retry-After": "1"})
        return held["status"], held["body"], held["headers"]
    try:
        code, out, headers = run()
    except BaseException:
        retrying(store.r.delete)(rkey)
        raise
    retrying(store.r.set)(rkey, json.dumps({"hash": digest, "status": code, "body": out, "headers": headers}), ex=ttl_s)
    return code, out, headers
