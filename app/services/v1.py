"""The OpenAI-compatible calls (app/routes/v1.py): one checked (the caller's task, ready; its inputs,
what they cost, the quota slot held) and its answers as they come, with options' scores as logprobs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import anyio.to_thread
from fastapi import status
from pydantic import ValidationError

from app.errors import ApiError, public
from app.limits import predict_tokens
from app.openai_schemas import ChatRequest, CompletionRequest, Sampled, Usage
from app.routing import task_fingerprint
from contract.queues import GENERATE
from model.settings import Settings
from model.task import Limits, Query


def owned_task(store, model: str, who: str) -> dict[str, Any]:
    rec = store.task(model) if len(model) <= 64 else None
    if rec is None or rec["tenant"] != who:
        raise ApiError(status.HTTP_404_NOT_FOUND, f"the model {model!r} is not one of your tasks (GET /v1/models lists "
                       "the ready ones)", param="model", code="model_not_found")
    return rec


def _ready(rec: dict[str, Any]) -> None:
    if rec["status"] == "failed":
        raise ApiError(status.HTTP_409_CONFLICT, f"the model {rec['id']} failed to adapt: {public(rec.get('error'))}",
                       param="model", code="model_failed")
    if rec["status"] != "ready":
        raise ApiError(status.HTTP_409_CONFLICT, f"the model {rec['id']} is {rec['status']}, not ready yet",
                       param="model", code="model_not_ready", headers={"Retry-After": "2"})


class Call:
    """One completion call, checked: the task, its inputs, what it costs, and how to answer."""

    def __init__(self, rec: dict[str, Any], texts: list[str], body: Sampled, s: Settings, count, param: str):
        self.rec, self.texts, self.body = rec, texts, body
        self.options = rec["task"].get("options")
        limits = Limits.of(s)
        self.sent = [{"input": t} for t in texts]  # the inputs as the worker gets them (an option task's)
        self.queries = []
        for i, q in enumerate(self.sent):
            try:
                self.queries.append(Query.model_validate(q, context={"limits": limits, "count_tokens": count}))
            except ValidationError as e:
                where = param if len(texts) == 1 else f"{param}[{i}]"
                raise ApiError(400, f"{where}: {e.errors()[0]['msg']}", param=param, code="invalid_value") from e
        self.max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or s.max_new_tokens
        if self.max_tokens > s.max_completion_tokens:
            raise ApiError(400, f"max_tokens is {self.max_tokens}; the limit is {s.max_completion_tokens} "
                           "(max_completion_tokens)", param="max_tokens", code="invalid_value")
        self.cost = predict_tokens(rec["task"], self.queries, count, self.max_tokens)
        if self.cost > s.max_predict_tokens:
            raise ApiError(400, f"this call scores {self.cost} tokens (each input with each option, or with max_tokens "
                           f"to generate); the limit is {s.max_predict_tokens} (max_predict_tokens): send fewer inputs",
                           param=param, code="too_costly")
        self.prompt_tokens = sum(count(t) for t in texts)
        self.count = count

    def usage(self, completion_tokens: int) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=self.prompt_tokens + completion_tokens, tokens_scored=self.cost)

    def sampling(self) -> dict[str, Any]:
        b = self.body
        return {"max_tokens": self.max_tokens, "temperature": b.temperature, "top_p": b.top_p, "stop": b.stops(),
                "seed": b.seed}


def _ranked(scores: dict[str, float], k: int) -> list[tuple[str, float]]:
    return sorted(scores.items(), key=lambda kv: -kv[1])[:k]


def text_logprobs(output: str, scores: dict[str, float], k: int) -> dict[str, Any]:
    """Completions' logprobs object, with an option standing for one token."""
    return {"tokens": [output], "token_logprobs": [scores[output]], "text_offset": [0],
            "top_logprobs": [dict(_ranked(scores, max(k, 1)))]}


def chat_logprobs(output: str, scores: dict[str, float], k: int) -> dict[str, Any]:
    """Chat's logprobs object, with an option standing for one token."""
    def entry(o: str, v: float) -> dict[str, Any]:
        return {"token": o, "logprob": v, "bytes": list(o.encode())}

    return {"content": [{**entry(output, scores[output]), "top_logprobs": [entry(o, v) for o, v in _ranked(scores, k)]}],
            "refusal": None}


async def answers(call: Call, state) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """(input index, piece) as they come: {text, tokens, finish, scores?}. An option task's answers
    come from the batcher (one worker call, the same answers as /predict); generation streams."""
    route = task_fingerprint(call.rec, state.fingerprint)
    if call.options:
        reply = await state.batcher(call.rec["id"], call.sent, route)
        for i, p in enumerate(reply["predictions"]):
            yield i, {"text": p["output"], "tokens": await anyio.to_thread.run_sync(call.count, p["output"]),
                      "finish": "stop", "scores": p["scores"]}
        return
    for i, q in enumerate(call.queries):
        async for piece in state.router.stream(route, GENERATE, [call.rec["id"], q.input, call.sampling()]):
            yield i, piece


async def _checked(body: Sampled, texts: list[str], param: str, state, who: str, s: Settings, store,
                   stack: AsyncExitStack) -> Call:
    lease_s = s.predict_timeout_s * max(len(texts), 1) + 60
    await stack.enter_async_context(state.quotas.slot(who, "predict", s.max_waiting_predicts, lease_s,
                                                      "completion and /predict calls", "max_waiting_predicts"))
    rec = await anyio.to_thread.run_sync(owned_task, store, body.model, who)
    call = await anyio.to_thread.run_sync(lambda: Call(rec, texts, body, s, state.count_tokens, param))
    _ready(rec)
    wants_scores = (body.logprobs is not None) if isinstance(body, CompletionRequest) else body.logprobs or body.top_logprobs
    if wants_scores and not call.options:
        raise ApiError(400, "logprobs: this task has no options; scores are given for the options of a task that has them",
                       param="logprobs", code="unsupported_value")
    return call



async def completion_call(body: CompletionRequest, state, who: str, s: Settings, store, stack: AsyncExitStack) -> Call:
    """A /v1/completions call checked, its quota slot held by `stack`: each prompt is an input."""
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(texts) > s.max_predict_inputs:
        raise ApiError(400, f"prompt: {len(texts)} inputs; the limit is {s.max_predict_inputs} (max_predict_inputs)",
                       param="prompt", code="invalid_value")
    return await _checked(body, texts, "prompt", state, who, s, store, stack)


async def chat_call(body: ChatRequest, state, who: str, s: Settings, store, stack: AsyncExitStack) -> Call:
    """A /v1/chat/completions call checked, its quota slot held by `stack`: the last user message
    with text is the input."""
    users = [m for m in body.messages if m.role == "user" and m.text().strip()]
    if not users:
        raise ApiError(400, "messages: the last user message with text is the input, and there is none",
                       param="messages", code="invalid_value")
    return await _checked(body, [users[-1].text()], "messages", state, who, s, store, stack)
