"""Schemathesis hooks for tests/test_service_schema.py: the positive cases obey the rules the
OpenAPI schema cannot state (JSON Schema has no "this value is one of that array"), so that a 422
for a positive case means a schema that does not say what the service enforces. Negative cases
are left as generated."""

from __future__ import annotations

from typing import Any

import schemathesis

TEXT_CHARS = 60  # token counts are not a JSON Schema notion: texts short enough for any tokenizer's limit
MAX_EPOCHS = 8  # steps are epochs x demonstrations / batch; the schema bounds steps alone


def _cut(x: Any) -> Any:
    if isinstance(x, str):
        return x[:TEXT_CHARS] if x[:TEXT_CHARS].strip() else "text"
    if isinstance(x, list):
        return [_cut(v) for v in x]
    if isinstance(x, dict):
        return {k: _cut(v) for k, v in x.items()}
    return x


def _task(body: dict[str, Any]) -> dict[str, Any]:
    body = {**body, "demonstrations": [dict(d) for d in body.get("demonstrations", [])]}
    for i, d in enumerate(body["demonstrations"]):
        own = d.get("options") if isinstance(d, dict) else None
        labels = own or body.get("options")
        if labels:  # an output is one of its options
            d["output"] = labels[i % len(labels)]
    body.pop("checkpoint", None)  # the registry's ids are the server's state, not the schema's
    body.pop("adapter", None)  # a zip made for this base is not a string JSON Schema can describe
    a = body.get("adaptation")
    if isinstance(a, dict) and isinstance(a.get("epochs"), (int, float)):
        body["adaptation"] = {**a, "epochs": min(a["epochs"], MAX_EPOCHS)}
    return body


def _meta_train(body: dict[str, Any]) -> dict[str, Any]:
    hp = body.get("hyperparameters")
    if not isinstance(hp, dict):
        return body
    hp = dict(hp)
    if hp.get("batch_tasks"):  # the config refuses batching with grad_checkpointing, or in the prediction prompt
        hp.update(grad_checkpointing=False, inner_context="sampled")
    if body.get("method") == "reptile" and hp.get("shared_moments"):
        hp["shared_moments"] = False  # the config refuses it: reptile's outer moments are not a gradient's
    return {**body, "hyperparameters": hp}


@schemathesis.hook
def map_case(context, case):
    if case.meta is None or not case.meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return case
    if case.operation.path == "/tasks" and case.method.upper() == "POST":
        case.body = _task(_cut(case.body))
    elif case.operation.path in ("/predict", "/v1/completions", "/v1/chat/completions"):
        case.body = _cut(case.body)
    elif case.operation.path == "/admin/meta-train":
        case.body = _meta_train(case.body)
    return case
