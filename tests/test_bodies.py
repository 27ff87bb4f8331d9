"""Request bodies: strict JSON (no NaN or Infinity, UTF-8 only) answered with a 422 after the key is
checked, and 422s that echo at most about 1 KB of what was sent. Needs Redis, no worker."""

from __future__ import annotations

import json

import pytest

from conftest import ADMIN_KEY, auth, sentiment

TASK = json.dumps(sentiment(tag="bodies"))[:-1]  # the task body without its closing brace, to add a field


@pytest.mark.parametrize("path,key,raw", [
    ("/tasks", None, TASK + ', "adaptation": {"lr": NaN}}'),
    ("/tasks", None, TASK + ', "adaptation": {"epochs": Infinity}}'),
    ("/tasks", None, TASK + ', "adaptation": {"seed": -Infinity}}'),
    ("/tasks", None, '{"demonstrations": [{"input": NaN, "output": "a"}]}'),
    ("/tasks", None, TASK + ', "adaptation": {"lr": 1e999}}'),  # valid JSON syntax, but no double holds it
    ("/predict", None, '{"task_id": "x", "inputs": ["a"], "wait_s": NaN}'),
    ("/predict", None, '{"task_id": "x", "inputs": ["a"], "wait_s": Infinity}'),
    ("/predict", None, '{"task_id": "x", "inputs": [NaN]}'),
    ("/admin/meta-train", ADMIN_KEY, '{"setting": "synthetic", "hyperparameters": {"inner_lr": NaN}}'),
    ("/admin/meta-train", ADMIN_KEY, '{"setting": "synthetic", "hyperparameters": {"steps": Infinity}}'),
    ("/admin/meta-train", ADMIN_KEY, '{"setting": NaN}'),
])
def test_nan_and_infinity_are_422_not_500(client, path, key, raw):
    r = client.post(path, content=raw, headers={**auth(*([key] if key else [])), "content-type": "application/json"})
    assert r.status_code == 422, r.text
    detail = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in the response"))["detail"]
    assert detail[0]["loc"] == ["body"] and "not valid JSON" in detail[0]["msg"], detail


def test_bad_json_names_what_is_wrong(client):
    h = {**auth(), "content-type": "application/json"}
    cases = [(b'{"task_id": "x", "inputs": ["a"], "wait_s": NaN}', "NaN"),
             (b'{"task_id": "x", "inputs": ["a"], "wait_s": 1e999}', "1e999"),
             (b'{"task_id": "x", "inputs": ["a"]', "line 1 column"),
             ('{"task_id": "x", "inputs": ["caf\u00e9"]}'.encode("latin-1"), "UTF-8"),
             (b"[" * 100_000, "nested too deeply")]
    for raw, says in cases:
        r = client.post("/predict", content=raw, headers=h)
        assert r.status_code == 422 and says in r.json()["detail"][0]["msg"], (raw, r.text)


@pytest.mark.parametrize("raw", [b'{"task_id": NaN}', b'{"task_id": "x", "inputs": ["\xff\xfe"]}', b"{not json"])
def test_a_bad_body_without_a_key_is_401(client, raw):
    """The key is checked before the body is looked at: nobody learns how the body is read without one."""
    for path in ("/predict", "/tasks", "/admin/meta-train"):
        r = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 401, (path, r.text)


@pytest.mark.parametrize("extra, where", [({"colour": "word " * 15_000}, "body.colour"),
                                          ({}, "body.demonstrations.0.input")])
def test_a_422_echoes_at_most_about_a_kilobyte(client, extra, where):
    # the body's shape is checked first, then its sizes against the settings' limits (model/task.py)
    big = "word " * 15_000  # 75 KB, twice within the request size limit, over the text limit
    r = client.post("/tasks", json={"demonstrations": [{"input": big, "output": "a"}] * 1, **extra}, headers=auth())
    assert r.status_code == 422
    assert len(r.content) < 4_000, len(r.content)
    errors = r.json()["detail"]
    assert where in {".".join(map(str, e["loc"])) for e in errors}
    for e in errors:
        assert len(json.dumps(e["input"])) < 1_200 and "75000 characters in all" in e["input"]


def test_an_unknown_query_parameter_is_422_naming_it(client):
    r = client.get("/tasks", params={"limit": 5, "ofset": 10}, headers=auth())
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["query", "ofset"] and "it takes limit, offset" in r.text


def test_405_allows_every_method_of_the_path(client):
    r = client.put("/tasks/abc", headers=auth())
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD", "DELETE"}, r.headers


def test_integral_numbers_are_integers_and_true_is_not_one(client):
    """JSON has one kind of number: 2.0 is a fine step count; true is no step count at all."""
    body = {**sentiment(tag="numbers"), "adaptation": {"mode": "none", "seed": 2.0}}
    assert client.post("/tasks", json=body, headers=auth()).status_code in (200, 202)
    r = client.post("/tasks", json={**body, "adaptation": {"mode": "none", "seed": True}}, headers=auth())
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "adaptation", "seed"], r.text
