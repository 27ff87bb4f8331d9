"""The task schema (Task, Example, Query) and its size Limits: what app/, worker/ and the task bank share.

A task is a few demonstrations {input, output}, an optional instruction and either options
(classification / multiple choice: the output is one of them) or none (generation). Options
may also be given per example, for multiple choice where each question has its own.

Limits are configurable: pass them through the validation context,
``Task.model_validate(data, context={"limits": Limits(...), "count_tokens": fn})``, or call
`validate_task` (the default `Limits()` unless given). Without limits in the context only the
shape is checked: a request body's first parse, and records that were checked when they came in.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class Limits:
    """How large a task may be; the defaults are the service's default settings."""

    max_demonstrations: int = 5000
    max_options: int = 32
    max_text_tokens: int = 256
    max_text_chars: int = 4000

    @classmethod
    def of(cls, s) -> Limits:
        """From a `Settings` (max_demonstrations, max_options, max_text_tokens, max_text_chars)."""
        return cls(s.max_demonstrations, s.max_options, s.max_text_tokens, s.max_text_chars)


# No limits: sizes go unchecked (the one check with the operator's limits comes after)
_UNLIMITED = Limits(*(float("inf"),) * 4)


def _limits(info: ValidationInfo) -> Limits:
    return (info.context or {}).get("limits") or _UNLIMITED


def _check_text(value: str, what: str, info: ValidationInfo) -> str:
    if not value or not value.strip():
        raise PydanticCustomError("empty_text", "{what} must not be empty", {"what": what})
    limits = _limits(info)
    if len(value) > limits.max_text_chars:
        raise PydanticCustomError(
            "text_too_long",
            "{what} has {n} characters; the limit is {limit}",
            {"what": what, "n": len(value), "limit": limits.max_text_chars},
        )
    count: Callable[[str], int] | None = (info.context or {}).get("count_tokens")
    if count is not None:
        n = count(value)
        if n > limits.max_text_tokens:
            raise PydanticCustomError(
                "text_too_long",
                "{what} has {n} tokens; the limit is {limit}",
                {"what": what, "n": n, "limit": limits.max_text_tokens},
            )
    return value


def _check_options(options: list[str] | None, info: ValidationInfo) -> list[str] | None:
    if options is None:
        return None
    limits = _limits(info)
    if len(options) < 2:
        raise PydanticCustomError("too_few_options", "options needs at least 2 entries, got {n}", {"n": len(options)})
    if len(options) > limits.max_options:
        raise PydanticCustomError(
            "too_many_options", "options has {n} entries; the limit is {limit}", {"n": len(options), "limit": limits.max_options}
        )
    seen: set[str] = set()
    for i, o in enumerate(options):
        _check_text(o, f"option {i}", info)
        if o in seen:
            raise PydanticCustomError("duplicate_option", "option {option} is given twice", {"option": repr(o)})
        seen.add(o)
    return options


class Example(BaseModel):
    """One demonstration (or labelled query): an input, its output, optional own options."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(description="the text the model sees")
    output: str = Field(description="the answer; one of the options when there are options")
    options: list[str] | None = Field(default=None, description="this example's own options (multiple choice)")

    @field_validator("input", "output")
    @classmethod
    def _text(cls, v: str, info: ValidationInfo) -> str:
        return _check_text(v, info.field_name, info)

    @field_validator("options")
    @classmethod
    def _opts(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return _check_options(v, info)

    @model_validator(mode="after")
    def _output_in_own_options(self) -> Example:
        if self.options is not None and self.output not in self.options:
            raise PydanticCustomError(
                "output_not_an_option", "output {output} is not one of the options {options}",
                {"output": repr(self.output), "options": self.options},
            )
        return self


class Query(BaseModel):
    """An input to answer; options override the task's for this query (multiple choice)."""

    model_config = ConfigDict(extra="forbid")

    input: str
    options: list[str] | None = None

    @field_validator("input")
    @classmethod
    def _text(cls, v: str, info: ValidationInfo) -> str:
        return _check_text(v, "input", info)

    @field_validator("options")
    @classmethod
    def _opts(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return _check_options(v, info)


class Task(BaseModel):
    """Demonstrations, optional instruction, optional options: what the model should learn."""

    model_config = ConfigDict(extra="forbid")

    demonstrations: list[Example] = Field(description="the examples to learn from")
    instruction: str | None = Field(default=None, description="optional natural-language instruction")
    options: list[str] | None = Field(default=None, description="the label set; omit for generation")

    @field_validator("demonstrations")
    @classmethod
    def _demos(cls, v: list[Example], info: ValidationInfo) -> list[Example]:
        if not v:
            raise PydanticCustomError("no_demonstrations", "a task needs at least one demonstration", {})
        limits = _limits(info)
        if len(v) > limits.max_demonstrations:
            raise PydanticCustomError(
                "too_many_demonstrations", "{n} demonstrations; the limit is {limit}",
                {"n": len(v), "limit": limits.max_demonstrations},
            )
        return v

    @field_validator("instruction")
    @classmethod
    def _instr(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else _check_text(v, "instruction", info)

    @field_validator("options")
    @classmethod
    def _opts(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return _check_options(v, info)

    @model_validator(mode="after")
    def _outputs_in_options(self) -> Task:
        if self.options is None:
            return self
        for i, d in enumerate(self.demonstrations):
            if d.options is None and d.output not in self.options:
                raise PydanticCustomError(
                    "output_not_an_option",
                    "demonstrations[{i}].output {output} is not one of the options {options}",
                    {"i": i, "output": repr(d.output), "options": self.options},
                )
        return self

    @property
    def is_generation(self) -> bool:
        return self.options is None and all(d.options is None for d in self.demonstrations)

    def options_for(self, q: Query | Example) -> list[str] | None:
        return q.options if q.options is not None else self.options


def validate_task(data: Any, limits: Limits | None = None, count_tokens: Callable[[str], int] | None = None) -> Task:
    return Task.model_validate(data, context={"limits": limits or Limits(), "count_tokens": count_tokens})
