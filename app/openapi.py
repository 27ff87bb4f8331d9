"""The OpenAPI schema states what the service enforces: the settings' limits (counts, lengths,
ranges) on the request bodies, texts that must hold a non-blank character, options given once,
the settings a meta-training run may name and the hyperparameters it may set. What JSON Schema
cannot state (a demonstration's output is one of the options; token counts; the steps that
epochs x demonstrations make) the field descriptions say, and a 422 names when it is broken.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.services.jobs import hyperparameters_schema
from model.settings import Settings

CHECKPOINT_ID = r"^(base|v[0-9]{4,}-[A-Za-z0-9_.-]+)$"


def _text(node: dict[str, Any], s: Settings) -> None:
    node.update(minLength=1, maxLength=s.max_text_chars, pattern=r"\S")
    node["description"] = (node.get("description", "") + f" (at most {s.max_text_tokens} tokens)").strip()


def _options(node: dict[str, Any], s: Settings) -> None:
    node.update(minItems=2, maxItems=s.max_options, uniqueItems=True)
    _text(node["items"], s)


def _optional(prop: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an `X | None` property."""
    return next(b for b in prop["anyOf"] if b.get("type") != "null")


def service_openapi(app: FastAPI, s: Settings, settings_names: list[str]) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    c = doc["components"]["schemas"]
    ex = c["Example"]["properties"]
    _text(ex["input"], s)
    _text(ex["output"], s)
    _options(_optional(ex["options"]), s)
    task = c["TaskCreate"]["properties"]
    task["demonstrations"].update(minItems=1, maxItems=s.max_demonstrations)
    _text(_optional(task["instruction"]), s)
    _options(_optional(task["options"]), s)
    _optional(task["checkpoint"])["pattern"] = CHECKPOINT_ID
    _optional(task["adapter"]).update(maxLength=4 * -(-s.max_adapter_bytes // 3), pattern=r"^[A-Za-z0-9+/]*={0,2}$")
    _optional(c["Adaptation"]["properties"]["steps"])["maximum"] = s.adapt_max_steps
    q = c["Query"]["properties"]
    _text(q["input"], s)
    _options(_optional(q["options"]), s)
    predict = c["PredictRequest"]["properties"]
    predict["inputs"]["maxItems"] = s.max_predict_inputs
    text, _ = predict["inputs"]["items"]["anyOf"]
    _text(text, s)
    predict["inputs"]["items"]["anyOf"] = [text, {"$ref": "#/components/schemas/Query"}]
    predict["wait_s"]["maximum"] = s.predict_wait_max_s
    completion = c["CompletionRequest"]["properties"]
    one, many = completion["prompt"]["anyOf"]
    _text(one, s)
    _text(many["items"], s)
    many["maxItems"] = s.max_predict_inputs
    for model in ("CompletionRequest", "ChatRequest"):
        props = c[model]["properties"]
        for name in ("max_tokens", "max_completion_tokens"):
            if name in props:
                _optional(props[name])["maximum"] = s.max_completion_tokens
    # the input: a user message with text (the last such one)
    c["ChatRequest"]["properties"]["messages"]["contains"] = {
        "type": "object", "required": ["role", "content"],
        "properties": {"role": {"const": "user"}, "content": {"anyOf": [
            {"type": "string", "pattern": r"\S", "maxLength": s.max_text_chars},
            {"type": "array", "contains": {"type": "object", "required": ["text"],
                                           "properties": {"text": {"type": "string", "pattern": r"\S"}}}}]}}}
    meta = c["MetaTrainRequest"]["properties"]
    meta["setting"] = {"type": "string", "enum": ["synthetic", *settings_names], "title": "Setting",
                       "description": "a task-bank setting (the bank must be built on the server) or 'synthetic'"}
    meta["hyperparameters"] = hyperparameters_schema()
    return doc
