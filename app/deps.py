"""Dependencies: settings, the record store, the Celery app and the caller's identity."""

from __future__ import annotations

import hmac
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader

from model.settings import Settings
from worker.store import Store

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="your API key")


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
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail, headers={"WWW-Authenticate": "X-API-Key"})


def tenant(s: SettingsDep, key: Annotated[str | None, Security(api_key_header)] = None) -> str:
    """The tenant the API key belongs to; 401 without a known key."""
    if not key:
        raise _unauthorized("missing X-API-Key header")
    for known, name in s.api_keys.items():
        if hmac.compare_digest(key.encode(), known.encode()):
            return name
    raise _unauthorized("unknown API key")


def admin(s: SettingsDep, key: Annotated[str | None, Security(api_key_header)] = None) -> None:
    """401 without a key or with an unknown one; 403 with a tenant's key."""
    if not key:
        raise _unauthorized("missing X-API-Key header")
    if hmac.compare_digest(key.encode(), s.admin_key.encode()):
        return
    if any(hmac.compare_digest(key.encode(), k.encode()) for k in s.api_keys):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this endpoint needs the admin key")
    raise _unauthorized("unknown API key")


TenantDep = Annotated[str, Depends(tenant)]
