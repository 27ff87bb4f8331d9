"""The OpenAI-compatible bodies (app/routes/v1.py): the completion and chat requests, checked
strictly, and the models, completions and usage they are answered with."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
