"""Predictions: in context, with the task's adapted weights, run by the worker that holds the model."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import ValidationError

from app.bodies import StrictJSONRoute
from app.deps import SettingsDep, StoreDep, TenantDep
from app.errors import ERRORS, invalid, invalid_from
from app.routes.tasks import owned
from app.schemas import OptionScore, PredictionOut, PredictRequest, PredictResponse
from model.task import Limits, Query

router = APIRouter(tags=["predict"], route_class=StrictJSONRoute)


@router.post("/predict", response_model=PredictResponse, responses=ERRORS)
def predict(body: PredictRequest, request: Request, who: TenantDep, s: SettingsDep, store: StoreDep) -> PredictResponse:
    """Answer each input: the best option with every option's score, or generated text.

    409 while the task is not ready; `wait_s` waits up to that long (bounded by the settings).
    """
    if len(body.inputs) > s.max_predict_inputs:
        raise invalid(("body", "inputs"), f"{len(body.inputs)} inputs; the limit is {s.max_predict_inputs}", "too_many_inputs")
    if body.wait_s > s.predict_wait_max_s:
        raise invalid(("body", "wait_s"), f"wait_s is {body.wait_s:g}; the limit is {s.predict_wait_max_s:g}", "wait_too_long")
    limits = Limits(s.max_demonstrations, s.max_options, s.max_text_tokens, s.max_text_chars)
    ctx = {"limits": limits, "count_tokens": request.app.state.count_tokens}
    queries = []
    for i, q in enumerate(body.inputs):
        try:
            queries.append(Query.model_validate(q.model_dump(exclude_none=True), context=ctx))
        except ValidationError as e:
            raise invalid_from(e, ("body", "inputs", i)) from e
    rec = owned(store, body.task_id, who)
    deadline = time.monotonic() + body.wait_s
    while rec["status"] in ("queued", "adapting") and time.monotonic() < deadline:
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        rec = owned(store, body.task_id, who)
    if rec["status"] == "failed":
        raise HTTPException(status.HTTP_409_CONFLICT, f"task {body.task_id} failed: {rec.get('error')}")
    if rec["status"] != "ready":
        step = f" (step {rec.get('step', 0)} of {rec.get('n_steps', 0)})" if rec["status"] == "adapting" else ""
        raise HTTPException(status.HTTP_409_CONFLICT, f"task {body.task_id} is {rec['status']}{step}, not ready")
    reply = request.app.state.batcher(body.task_id, [q.model_dump(exclude_none=True) for q in queries])
    preds = [
        PredictionOut(input=q.input, output=p["output"],
                      scores=None if p["scores"] is None else [OptionScore(option=o, score=v) for o, v in p["scores"].items()])
        for q, p in zip(queries, reply["predictions"])
    ]
    return PredictResponse(task_id=body.task_id, predictions=preds)
