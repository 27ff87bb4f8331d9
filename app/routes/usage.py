"""GET /usage: the caller's use of each of its quotas, against the limit."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from app.bodies import StrictRoute
from app.deps import SettingsDep, StoreDep, TenantDep
from app.errors import ERRORS

router = APIRouter(tags=["usage"], route_class=StrictRoute)


class Use(BaseModel):
    used: int | float
    limit: int | float
    retry_after_s: int | None = Field(None, description="when a limit over time is reached: seconds until it is not")


class UsageOut(BaseModel):
    tenant: str
    requests_per_minute: Use = Field(description="requests in the last 60 s (max_requests_per_minute)")
    tasks: Use = Field(description="task records held (max_tasks)")
    weights_bytes: Use = Field(description="bytes of adapted and imported weights the tasks hold (max_weights_bytes)")
    adapt_seconds_per_hour: Use = Field(description="worker seconds of adaptation in the last hour (max_adapt_seconds_per_hour)")
    waiting_predicts: Use = Field(description="/predict and /v1 completion calls in flight (max_waiting_predicts)")
    event_streams: Use = Field(description="GET /tasks/{id}/events streams open (max_event_streams)")


@router.get("/usage", response_model=UsageOut, responses=ERRORS)
async def usage(request: Request, who: TenantDep, s: SettingsDep, store: StoreDep) -> UsageOut:
    """What the caller uses of each quota; this request counts in requests_per_minute."""
    return UsageOut(tenant=who, **await request.app.state.quotas.usage(store, who, s))
