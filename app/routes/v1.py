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
from typing import Annotated, Any, Literal

import anyio.to_thread
from fastapi import APIRouter, Request, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from app.bodies import StrictRoute
from app.deps import SettingsDep, StoreDep, TenantDep
from app.errors import V1_ERRORS, ApiError, openai_error, public
from app.limits import predict_tokens
from app.routing import task_fingerprint
from contract.queues import GENERATE
from model.settings import Settings
from model.task import Limits, Query

router = APIRouter(prefix="/v1", tags=["openai"], route_class=StrictRoute, responses=V1_ERRORS)
Text = Annotated[str, Field(min_length=1)]
Stop = Text | Annotated[list[Text], Field(max_length=4)] | None
ONLY_ZERO = {"minimum": 0, "maximum": 0}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="a last chunk with the usage, its choices empty")


class Sampled(BaseModel):
    """What both endpoints take besides the prompt."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=64, description="a task id (GET /v1/models lists the ready ones)")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most (tasks without options); "
                                   "default the setting max_new_tokens, at most max_completion_tokens")
    temperature: float = Field(0.0, ge=0, le=2, description="0: the most likely token each time (default here)")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = Field(None, description="up to 4 sequences that end the text (not included); a newline always does")
    seed: int | None = Field(None, ge=0, le=2**53, description="makes sampling repeatable")
    user: str | None = Field(None, max_length=256, description="accepted, not used")
    presence_penalty: float = Field(0.0, description="only 0 is supported", json_schema_extra=ONLY_ZERO)
    frequency_penalty: float = Field(0.0, description="only 0 is supported", json_schema_extra=ONLY_ZERO)

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _zero(cls, v: float) -> float:
        if v != 0:
            raise ValueError("only 0 is supported by this service")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(Sampled):
    prompt: str | Annotated[list[str], Field(min_length=1)] = Field(description="one input, or a list of inputs "
                                                                     "(one choice each)")
    logprobs: int | None = Field(None, ge=0, le=5, description="tasks with options: the best `logprobs` options' scores")
    echo: bool = Field(False, description="the prompt before the text")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content or [])


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1, description="the last user message with text is the input; the "
                                    "task's demonstrations are its context, so other messages are not used")
    max_completion_tokens: int | None = Field(None, ge=1, description="as max_tokens (which it replaces)")
    logprobs: bool = Field(False, description="tasks with options: the chosen option's score")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="and the best `top_logprobs` options' scores")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens of the inputs")
    completion_tokens: int = Field(description="tokens of the answers")
    total_tokens: int
    tokens_scored: int = Field(description="what the call cost the worker: each input with each of its options, "
                               "or with max_tokens to generate (as max_predict_tokens counts)")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


SSE = {"text/event-stream": {"schema": {"type": "object", "properties": {"data": {"type": "string"}}, "required": ["data"],
                                        "description": "with stream: each chunk (JSON) as an event's data, then [DONE]"}}}


def _card(rec: dict[str, Any]) -> ModelCard:
    return ModelCard(id=rec["id"], created=int(rec["created_at"]), owned_by=rec["tenant"])


@router.get("/models", response_model=ModelList)
def list_models(who: TenantDep, s: SettingsDep, store: StoreDep) -> ModelList:
    """The caller's ready tasks, newest first, one model each."""
    recs, _ = store.list_tasks(who, 0, s.max_tasks, {"ready"})
    return ModelList(data=[_card(r) for r in recs])


def _task(store, model: str, who: str) -> dict[str, Any]:
    rec = store.task(model) if len(model) <= 64 else None
    if rec is None or rec["tenant"] != who:
        raise ApiError(status.HTTP_404_NOT_FOUND, f"the model {model!r} is not one of your tasks (GET /v1/models lists "
                       "the ready ones)", param="model", code="model_not_found")
    return rec


@router.get("/models/{model}", response_model=ModelCard)
def get_model(model: str, who: TenantDep, store: StoreDep) -> ModelCard:
    return _card(_task(store, model, who))


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
        self.queries = []
        for i, t in enumerate(texts):
            try:
                self.queries.append(Query.model_validate({"input": t}, context={"limits": limits, "count_tokens": count}))
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


async def _answers(call: Call, request: Request) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """(input index, piece) as they come: {text, tokens, finish, scores?}. An option task's answers
    come from the batcher (one worker call, the same answers as /predict); generation streams."""
    state = request.app.state
    route = task_fingerprint(call.rec, state.fingerprint)
    if call.options:
        reply = await state.batcher(call.rec["id"], [q.model_dump(exclude_none=True) for q in call.queries], route)
        for i, p in enumerate(reply["predictions"]):
            yield i, {"text": p["output"], "tokens": await anyio.to_thread.run_sync(call.count, p["output"]),
                      "finish": "stop", "scores": p["scores"]}
        return
    for i, q in enumerate(call.queries):
        async for piece in state.router.stream(route, GENERATE, [call.rec["id"], q.input, call.sampling()]):
            yield i, piece


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


async def _checked(body: Sampled, texts: list[str], param: str, request: Request, who: str, s: Settings, store,
                   stack: AsyncExitStack) -> Call:
    state = request.app.state
    lease_s = s.predict_timeout_s * max(len(texts), 1) + 60
    await stack.enter_async_context(state.quotas.slot(who, "predict", s.max_waiting_predicts, lease_s,
                                                      "completion and /predict calls", "max_waiting_predicts"))
    rec = await anyio.to_thread.run_sync(_task, store, body.model, who)
    call = await anyio.to_thread.run_sync(lambda: Call(rec, texts, body, s, state.count_tokens, param))
    _ready(rec)
    wants_scores = (body.logprobs is not None) if isinstance(body, CompletionRequest) else body.logprobs or body.top_logprobs
    if wants_scores and not call.options:
        raise ApiError(400, "logprobs: this task has no options; scores are given for the options of a task that has them",
                       param="logprobs", code="unsupported_value")
    return call


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
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(texts) > s.max_predict_inputs:
        raise ApiError(400, f"prompt: {len(texts)} inputs; the limit is {s.max_predict_inputs} (max_predict_inputs)",
                       param="prompt", code="invalid_value")
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    async with AsyncExitStack() as stack:
        call = await _checked(body, texts, "prompt", request, who, s, store, stack)

        def logprobs(piece: dict[str, Any]) -> dict[str, Any] | None:
            return text_logprobs(piece["text"], piece["scores"], body.logprobs) if body.logprobs is not None else None

        def head(i: int) -> str:
            return texts[i] if body.echo else ""

        if body.stream:
            async def chunks() -> AsyncIterator[bytes]:
                used, started = 0, set()
                async for i, piece in _answers(call, request):
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
        async for i, piece in _answers(call, request):
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
    users = [m for m in body.messages if m.role == "user" and m.text().strip()]
    if not users:
        raise ApiError(400, "messages: the last user message with text is the input, and there is none",
                       param="messages", code="invalid_value")
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    k = body.top_logprobs or 0

    def logprobs(piece: dict[str, Any]) -> dict[str, Any] | None:
        wanted = body.logprobs or body.top_logprobs is not None
        return chat_logprobs(piece["text"], piece["scores"], k) if wanted and piece.get("scores") else None

    async with AsyncExitStack() as stack:
        call = await _checked(body, [users[-1].text()], "messages", request, who, s, store, stack)
        if body.stream:
            async def chunks() -> AsyncIterator[bytes]:
                base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                        "system_fingerprint": None}
                yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
                used = 0
                async for _, piece in _answers(call, request):
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
        async for _, piece in _answers(call, request):
            text += piece["text"]
            last = piece
    choice = ChatChoice(index=0, message={"role": "assistant", "content": text, "refusal": None},
                        logprobs=logprobs({**last, "text": text}), finish_reason=last["finish"])
    return ChatCompletion(id=cid, created=created, model=body.model, choices=[choice], usage=call.usage(last["tokens"]))
