"""What one request may cost: the tokens a /predict call makes the worker score."""

from __future__ import annotations

import pytest

from conftest import LIMITS_TOKENS, auth

pytestmark = pytest.mark.usefixtures("worker")
LONG = "alpha beta gamma delta " * 10  # ~190 tokens of the tiny model's tokenizer


def test_a_predict_call_scoring_too_many_tokens_is_422_naming_the_limit(client):
    options = [f"opt{i} {LONG}" for i in range(32)]
    demos = [{"input": "x", "output": options[0]}, {"input": "y", "output": options[1]}]
    r = client.post("/tasks", json={"demonstrations": demos, "options": options, "adaptation": {"mode": "none"}},
                    headers=auth())
    assert r.status_code == 202, r.text
    tid = r.json()["id"]
    r = client.post("/predict", json={"task_id": tid, "inputs": [f"{LONG} {i}" for i in range(8)]}, headers=auth())
    assert r.status_code == 422, r.text
    err = r.json()["detail"][0]
    assert err["loc"] == ["body", "inputs"] and f"the limit is {LIMITS_TOKENS}" in err["msg"], err
    # per-query options count too, and a call within the limit is answered
    r = client.post("/predict", json={"task_id": tid, "inputs": [{"input": LONG, "options": options[:3]}] * 60},
                    headers=auth())
    assert r.status_code == 422 and "tokens" in r.text
    r = client.post("/predict", json={"task_id": tid, "inputs": ["short"]}, headers=auth())
    assert r.status_code == 200, r.text
