"""Dependencies: settings, the record store, the Celery app and the caller's identity.

A key comes as `X-API-Key: <key>` or as `Authorization: Bearer <key>` (what OpenAI's clients send);
every request of a tenant counts against its requests per minute (app/quotas.py).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from contract.store import Store
from model.settings import Settings

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="your API key")
bearer = HTTPBearer(auto_error=False, description="your API key, as OpenAI's clients send it")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
CeleryDep = Annotated[Celery, Depends(get_celery)]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "X-API-Key, Bearer"})


def presented_key(key: Annotated[str | None, Security(api_key_header)] = None,
                  token: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None) -> str:
    """The key the caller presented, from either header (X-API-Key first); 401 without one."""
    key = key or (token.credentials if token else None)
    if not key:
        raise _unauthorized("missing API key: send X-API-Key: <key> or Authorization: Bearer <key>")
    return key


KeyDep = Annotated[str, Depends(presented_key)]


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


async def tenant(request: Request, s: SettingsDep, key: KeyDep) -> str:
    """The tenant the API key belongs to (401 without a known key), after counting the request
    against its requests per minute (429 beyond)."""
    for known, name in s.api_keys.items():
        if _same(key, known):
            await request.app.state.quotas.hit(name, s.max_requests_per_minute)
            return name
    raise _unauthorized("unknown API key")


def admin(s: SettingsDep, key: KeyDep) -> None:
    """401 without a key or with an unknown one; 403 with a tenant's key."""
    if _same(key, s.admin_key):
        return
    if any(_same(key, k) for k in s.api_keys):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this endpoint needs the admin key")
    raise _unauthorized("unknown API key")


TenantDep = Annotated[str, Depends(tenant)]
