"""Predictions: in context, with the task's adapted weights, run by the worker that holds the model.

The route is async: a call waiting for its task to be ready or for the worker holds no thread,
and each tenant has at most max_waiting_predicts calls in flight (429 beyond).
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Request, status
from pydantic import ValidationError

from app.bodies import StrictRoute
from app.deps import SettingsDep, StoreDep, TenantDep
from app.errors import ERRORS, invalid, invalid_from, public
from app.limits import predict_tokens
from app.routes.tasks import owned
from app.routing import task_fingerprint
from app.schemas import OptionScore, PredictionOut, PredictRequest, PredictResponse, PredictUsage
from app.watcher import UNDERWAY
from model.settings import Settings
from model.task import Limits, Query

router = APIRouter(tags=["predict"], route_class=StrictRoute)


def checked_inputs(body: PredictRequest, s: Settings, count_tokens) -> list[dict[str, Any]]:
    """The inputs as the worker gets them ({input, options?}), checked against the settings' limits
    (tokens counted): 422 names the field and the limit. body.inputs stay the call's Query values."""
    if len(body.inputs) > s.max_predict_inputs:
        raise invalid(("body", "inputs"), f"{len(body.inputs)} inputs; the limit is {s.max_predict_inputs}", "too_many_inputs")
    if body.wait_s > s.predict_wait_max_s:
        raise invalid(("body", "wait_s"), f"wait_s is {body.wait_s:g}; the limit is {s.predict_wait_max_s:g}", "wait_too_long")
    ctx = {"limits": Limits.of(s), "count_tokens": count_tokens}
    sent = [q.model_dump(exclude_none=True) for q in body.inputs]
    for i, q in enumerate(sent):
        try:
            Query.model_validate(q, context=ctx)  # the limits' check (the body's schema had none)
        except ValidationError as e:
            raise invalid_from(e, ("body", "inputs", i)) from e
    return sent


def check_ready(task_id: str, rec: dict[str, Any]) -> None:
    if rec["status"] == "failed":
        raise HTTPException(status.HTTP_409_CONFLICT, f"task {task_id} failed: {public(rec.get('error'))}")
    if rec["status"] != "ready":
        step = f" (step {rec.get('step', 0)} of {rec.get('n_steps', 0)})" if rec["status"] == "adapting" else ""
        raise HTTPException(status.HTTP_409_CONFLICT, f"task {task_id} is {rec['status']}{step}, not ready")


@router.post("/predict", response_model=PredictResponse, responses=ERRORS)
async def predict(body: PredictRequest, request: Request, who: TenantDep, s: SettingsDep, store: StoreDep) -> PredictResponse:
    """Answer each input: the best option with every option's score, or generated text.

    409 while the task is not ready; `wait_s` waits up to that long (bounded by the settings).
    429 (with Retry-After) while this tenant already has max_waiting_predicts calls in flight.
    """
    state = request.app.state
    lease_s = min(body.wait_s, s.predict_wait_max_s) + s.predict_timeout_s + 60  # wait_s is checked in the slot
    # The slot first: a call over the quota is refused for one Redis round trip, before any work.
    async with state.quotas.slot(who, "predict", s.max_waiting_predicts, lease_s, "/predict calls",
                                 "max_waiting_predicts"):
        sent = await anyio.to_thread.run_sync(checked_inputs, body, s, state.count_tokens)
        rec = await anyio.to_thread.run_sync(owned, store, body.task_id, who)
        cost = await anyio.to_thread.run_sync(predict_tokens, rec["task"], body.inputs, state.count_tokens,
                                              s.max_new_tokens)
        if cost > s.max_predict_tokens:
            raise invalid(("body", "inputs"), f"this call scores {cost} tokens (each input with each of its options); the "
                          f"limit is {s.max_predict_tokens}: send fewer inputs, or shorter or fewer options, per call",
                          "too_costly")
        if rec["status"] in UNDERWAY and body.wait_s > 0:
            await state.watcher.wait(body.task_id, body.wait_s)
            rec = await anyio.to_thread.run_sync(owned, store, body.task_id, who)
        check_ready(body.task_id, rec)
        reply = await state.batcher(body.task_id, sent, task_fingerprint(rec, state.fingerprint))
    preds = [
        PredictionOut(input=q.input, output=p["output"],
                      scores=None if p["scores"] is None else [OptionScore(option=o, score=v) for o, v in p["scores"].items()])
        for q, p in zip(body.inputs, reply["predictions"])
    ]
    return PredictResponse(task_id=body.task_id, predictions=preds, usage=PredictUsage(tokens_scored=cost))
