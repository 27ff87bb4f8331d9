"""OpenAI-compatible endpoints: a caller's ready tasks are its models.

`model` is a task id. A task with options answers each prompt with its best option (the same
answer as /predict); `logprobs` then gives the options' scores, best first: not token
log-probabilities but what /predict ranks by, each option's mean log-likelihood per token (or
the sum, as the task's recipe says) minus its calibrated prior, so that they may be above 0.
A task without options generates, honouring max_tokens, temperature, top_p, seed, stop and
stream; a newline always ends an answer (the prompt format separates examples with one).
temperature defaults to 0 here (the /predict answer), not OpenAI's 1. Errors come in OpenAI's
shape (app/errors.py), keys as `Authorization: Bearer` or X-API-Key.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException

from app.bodies import StrictRoute
from app.deps import SettingsDep, StoreDep, TenantDep
from app.errors import V1_ERRORS, openai_error
from app.openai_schemas import (ChatChoice, ChatCompletion, ChatRequest, Completion, CompletionChoice,
                                CompletionRequest, ModelCard, ModelList)
from app.services import v1 as service

router = APIRouter(prefix="/v1", tags=["openai"], route_class=StrictRoute, responses=V1_ERRORS)


SSE = {"text/event-stream": {"schema": {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"],
                                        "description": "with stream: each chunk (JSON) as an event's data, then [DONE]"}}}


def _card(rec: dict[str, Any]) -> ModelCard:
    return ModelCard(id=rec["id"], created=int(rec["created_at"]), owned_by=rec["tenant"])


@router.get("/models", response_model=ModelList)
def list_models(who: TenantDep, s: SettingsDep, store: StoreDep) -> ModelList:
    """The caller's ready tasks, newest first, one model each."""
    recs, _ = store.list_tasks(who, 0, s.max_tasks, {"ready"})
    return ModelList(data=[_card(r) for r in recs])


@router.get("/models/{model}", response_model=ModelCard)
def get_model(model: str, who: TenantDep, store: StoreDep) -> ModelCard:
    return _card(service.owned_task(store, model, who))


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def _streamed(stack: AsyncExitStack, chunks: AsyncIterator[bytes]) -> StreamingResponse:
    """The chunks as server-sent events, the quota slot held until the last one (or the client
    going away, which closes the worker's stream too)."""
    held = stack.pop_all()

    async def events() -> AsyncIterator[bytes]:
        async with held:
            try:
                async for c in chunks:
                    yield c
            except HTTPException as e:  # the worker failed mid-stream: say so in the stream, then end it
                yield _sse(openai_error(e.status_code, str(e.detail)))
            yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/completions", response_model=Completion, responses={200: {"content": SSE}})
async def completions(body: CompletionRequest, request: Request, who: TenantDep, s: SettingsDep, store: StoreDep):
    """Each prompt answered by the task `model` (see the module's doc for options, logprobs and generation)."""
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    async with AsyncExitStack() as stack:
        call = await service.completion_call(body, request.app.state, who, s, store, stack)

        def logprobs(piece: dict[str, Any]) -> dict[str, Any] | None:
            return service.text_logprobs(piece["text"], piece["scores"], body.logprobs) if body.logprobs is not None else None

        def head(i: int) -> str:
            return call.texts[i] if body.echo else ""

        if body.stream:
            async def chunks() -> AsyncIterator[bytes]:
                used, started = 0, set()
                async for i, piece in service.answers(call, request.app.state):
                    text = piece["text"] if i in started else head(i) + piece["text"]
                    started.add(i)
                    if piece["finish"]:
                        used += piece["tokens"]
                    choice = {"index": i, "text": text, "logprobs": logprobs(piece) if piece.get("scores") else None,
                              "finish_reason": piece["finish"]}
                    yield _sse({"id": cid, "object": "text_completion", "created": created, "model": body.model,
                                "choices": [choice]})
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({"id": cid, "object": "text_completion", "created": created, "model": body.model,
                                "choices": [], "usage": call.usage(used).model_dump()})
            return _streamed(stack, chunks())
        out: dict[int, dict[str, Any]] = {}
        async for i, piece in service.answers(call, request.app.state):
            got = out.setdefault(i, {"text": head(i), "finish": None, "tokens": 0, "scores": None})
            got["text"] += piece["text"]
            got.update(finish=piece["finish"], tokens=piece["tokens"], scores=piece.get("scores"))
    choices = [CompletionChoice(index=i, text=a["text"], finish_reason=a["finish"],
                                logprobs=logprobs(a) if a["scores"] else None) for i, a in sorted(out.items())]
    return Completion(id=cid, created=created, model=body.model, choices=choices,
                      usage=call.usage(sum(a["tokens"] for a in out.values())))


@router.post("/chat/completions", response_model=ChatCompletion, responses={200: {"content": SSE}})
async def chat_completions(body: ChatRequest, request: Request, who: TenantDep, s: SettingsDep, store: StoreDep):
    """The last user message answered by the task `model`, as /v1/completions answers a prompt."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    k = body.top_logprobs or 0

    def logprobs(piece: dict[str, Any]) -> dict[str, Any] | None:
        wanted = body.logprobs or body.top_logprobs is not None
        return service.chat_logprobs(piece["text"], piece["scores"], k) if wanted and piece.get("scores") else None

    async with AsyncExitStack() as stack:
        call = await service.chat_call(body, request.app.state, who, s, store, stack)
        if body.stream:
            async def chunks() -> AsyncIterator[bytes]:
                base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                        "system_fingerprint": None}
                yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
                used = 0
                async for _, piece in service.answers(call, request.app.state):
                    if piece["text"]:
                        yield _sse({**base, "choices": [{"index": 0, "delta": {"content": piece["text"]},
                                                         "logprobs": logprobs(piece), "finish_reason": None}]})
                    if piece["finish"]:
                        used = piece["tokens"]
                        yield _sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                         "finish_reason": piece["finish"]}]})
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**base, "choices": [], "usage": call.usage(used).model_dump()})
            return _streamed(stack, chunks())
        text, last = "", {}
        async for _, piece in service.answers(call, request.app.state):
            text += piece["text"]
            last = piece
    choice = ChatChoice(index=0, message={"role": "assistant", "content": text, "refusal": None},
                        logprobs=logprobs({**last, "text": text}), finish_reason=last["finish"])
    return ChatCompletion(id=cid, created=created, model=body.model, choices=[choice], usage=call.usage(last["tokens"]))
