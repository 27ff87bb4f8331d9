"""The HTTP surface: keys and tenants, admin access, limits and the messages bad input gets.

These need Redis but no worker: nothing here reaches the model."""

from __future__ import annotations

import pytest

from conftest import ADMIN_KEY, KEY, OTHER_KEY, auth, sentiment, settings


def detail(r) -> str:
    d = r.json()["detail"]
    return d if isinstance(d, str) else " | ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in d)


def test_no_key_or_unknown_key_is_401(client):
    for headers in ({}, {"X-API-Key": "nope"}):
        r = client.get("/tasks", headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "X-API-Key, Bearer"
    assert client.post("/predict", json={"task_id": "x", "inputs": ["a"]}).status_code == 401


def test_another_tenants_task_is_404(client):
    r = client.post("/tasks", json={**sentiment(tag="tenant"), "adaptation": {"mode": "none"}}, headers=auth())
    assert r.status_code == 202, r.text
    tid = r.json()["id"]
    assert client.get(f"/tasks/{tid}", headers=auth()).status_code == 200
    for call in (
        lambda h: client.get(f"/tasks/{tid}", headers=h),
        lambda h: client.delete(f"/tasks/{tid}", headers=h),
        lambda h: client.get(f"/tasks/{tid}/adapter", headers=h),
        lambda h: client.post("/predict", json={"task_id": tid, "inputs": ["a"]}, headers=h),
    ):
        r = call(auth(OTHER_KEY))
        assert r.status_code == 404 and r.json()["detail"] == f"task {tid} not found"
    assert tid not in [t["id"] for t in client.get("/tasks", headers=auth(OTHER_KEY)).json()["items"]]
    assert client.get(f"/tasks/{tid}", headers=auth()).status_code == 200  # still there for its owner
    assert client.get("/tasks/does-not-exist", headers=auth()).status_code == 404


@pytest.mark.parametrize("path,method", [
    ("/admin/checkpoints", "get"), ("/admin/jobs/abc", "get"), ("/admin/jobs/abc/cancel", "post"),
    ("/admin/checkpoints/base/activate", "post"), ("/admin/meta-train", "post"),
])
def test_admin_needs_the_admin_key(client, path, method):
    # an invalid run config: the admin key gets past auth (422) without starting a run
    body = {"json": {"setting": "synthetic", "hyperparameters": {"steps": -1}}} if method == "post" else {}
    assert getattr(client, method)(path, **body).status_code == 401
    assert getattr(client, method)(path, headers={"X-API-Key": "unknown"}, **body).status_code == 401
    r = getattr(client, method)(path, headers=auth(KEY), **body)
    assert r.status_code == 403 and r.json()["detail"] == "this endpoint needs the admin key"
    assert getattr(client, method)(path, headers=auth(ADMIN_KEY), **body).status_code not in (401, 403)


def test_admin_key_is_not_a_tenant_key(client):
    assert client.get("/tasks", headers=auth(ADMIN_KEY)).status_code == 401


def test_refuses_to_start_with_example_keys_outside_development(redis_servers):
    from app.main import create_app

    with pytest.raises(RuntimeError, match="example API keys"):
        create_app(settings(env="production", api_keys={"dev-key": "dev"}))
    with pytest.raises(RuntimeError, match="example API keys"):
        create_app(settings(env="production", admin_key="dev-admin-key"))
    create_app(settings(env="production"))  # real keys: starts
    create_app(settings(env="development", api_keys={"dev-key": "dev"}, admin_key="dev-admin-key"))


def test_body_over_the_limit_is_413(client):
    big = {"task_id": "t", "inputs": ["x" * 3000] * 100}
    r = client.post("/predict", json=big, headers=auth())
    assert r.status_code == 413 and "200000 bytes (max_request_bytes)" in r.json()["detail"]
    # POST /tasks takes demonstrations up to max_upload_bytes (2,000,000 here)
    big = {"demonstrations": [{"input": "x" * 3000, "output": "y"}] * 700}
    r = client.post("/tasks", json=big, headers=auth())
    assert r.status_code == 413 and "2000000 bytes (max_upload_bytes)" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(30):
            yield b" " * 10_000

    r = client.post("/predict", content=chunks(), headers={**auth(), "content-type": "application/json"})
    assert r.status_code == 413


LIMITS = settings()


@pytest.mark.parametrize("body,loc,message", [
    ({"demonstrations": []}, "body.demonstrations", "at least one demonstration"),
    ({"demonstrations": [{"input": "a " * 300, "output": "b"}]}, "body.demonstrations.0.input",
     f"tokens; the limit is {LIMITS.max_text_tokens}"),
    ({"demonstrations": [{"input": "a" * (LIMITS.max_text_chars + 1), "output": "b"}]}, "body.demonstrations.0.input",
     f"characters; the limit is {LIMITS.max_text_chars}"),
    ({"demonstrations": [{"input": " ", "output": "b"}]}, "body.demonstrations.0.input", "must not be empty"),
    ({"demonstrations": [{"input": "a", "output": "maybe"}], "options": ["yes", "no"]}, "body",
     "'maybe' is not one of the options"),
    ({"demonstrations": [{"input": "a", "output": "yes"}], "options": ["yes"]}, "body.options", "at least 2 entries"),
    ({"demonstrations": [{"input": "a", "output": "o0"}], "options": [f"o{i}" for i in range(LIMITS.max_options + 1)]},
     "body.options", f"the limit is {LIMITS.max_options}"),
    ({"demonstrations": [{"input": "a", "output": "yes"}], "options": ["yes", "no", "yes"]}, "body.options",
     "option 'yes' is given twice"),
    ({**sentiment(), "adaptation": {"steps": 61}}, "body.adaptation.steps", "steps is 61; the limit is 60"),
    ({**sentiment(), "adaptation": {"epochs": 999}}, "body.adaptation.epochs", "steps; the limit is 60"),
    ({**sentiment(), "adaptation": {"mode": "sideways"}}, "body.adaptation.mode", "'lora', 'full' or 'none'"),
    ({**sentiment(), "adaptation": {"lr": 0}}, "body.adaptation.lr", "greater than 0"),
    ({**sentiment(), "checkpoint": "v0001-nope"}, "body.checkpoint", "no checkpoint 'v0001-nope'"),
    ({**sentiment(), "checkpoint": "../../etc"}, "body.checkpoint", "not a checkpoint id"),
    ({**sentiment(), "colour": "red"}, "body.colour", "Extra inputs are not permitted"),
])
def test_bad_task_is_422_naming_field_and_limit(client, body, loc, message):
    r = client.post("/tasks", json=body, headers=auth())
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(".".join(map(str, e["loc"])).startswith(loc) and message in e["msg"] for e in errors), errors


def test_space_is_the_field_and_mode_its_alias(client):
    """lora/full/none is `space` (`mode`, its old name, is accepted); a task says both."""
    by_space = client.post("/tasks", json={**sentiment(tag="space"), "adaptation": {"space": "none"}}, headers=auth())
    by_mode = client.post("/tasks", json={**sentiment(tag="space"), "adaptation": {"mode": "none"}}, headers=auth())
    assert by_space.status_code == 202 and by_mode.status_code == 200, (by_space.text, by_mode.text)
    assert by_mode.json()["id"] == by_space.json()["id"]  # the same task either way
    assert by_space.json()["space"] == by_space.json()["mode"] == "none"
    r = client.post("/tasks", json={**sentiment(), "adaptation": {"space": "sideways"}}, headers=auth())
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "space", r.text


def test_bad_predict_is_4xx_with_message(client):
    tid = client.post("/tasks", json={**sentiment(tag="badpredict"), "adaptation": {"mode": "none"}}, headers=auth()).json()["id"]
    cases = [
        ({"task_id": tid, "inputs": []}, "body.inputs", "at least 1 item"),
        ({"task_id": tid, "inputs": ["a"] * (LIMITS.max_predict_inputs + 1)}, "body.inputs",
         f"{LIMITS.max_predict_inputs + 1} inputs; the limit is {LIMITS.max_predict_inputs}"),
        ({"task_id": tid, "inputs": ["a " * 300]}, "body.inputs.0.input", f"the limit is {LIMITS.max_text_tokens}"),
        ({"task_id": tid, "inputs": [{"input": "a", "options": ["x"]}]}, "body.inputs.0.options", "at least 2 entries"),
        ({"task_id": tid, "inputs": ["a"], "wait_s": 1e6}, "body.wait_s", f"the limit is {LIMITS.predict_wait_max_s:g}"),
        ({"task_id": tid, "inputs": ["a"], "wait_s": -1}, "body.wait_s", "greater than or equal to 0"),
    ]
    for body, loc, message in cases:
        r = client.post("/predict", json=body, headers=auth())
        assert r.status_code == 422, (body, r.text)
        assert any(".".join(map(str, e["loc"])).startswith(loc) and message in e["msg"] for e in r.json()["detail"]), r.text
    r = client.post("/predict", json={"task_id": "0" * 32, "inputs": ["a"]}, headers=auth())
    assert r.status_code == 404


def test_bad_pagination_is_422(client):
    r = client.get("/tasks", params={"limit": 1000}, headers=auth())
    assert r.status_code == 422 and "less than or equal to 100" in detail(r)


def test_meta_train_request_is_validated(client):
    h = auth(ADMIN_KEY)
    r = client.post("/admin/meta-train", json={"setting": "synthetic", "hyperparameters": {"steps": -1}}, headers=h)
    assert r.status_code == 422 and "body.hyperparameters.steps" in detail(r)
    r = client.post("/admin/meta-train", json={"setting": "synthetic", "hyperparameters": {"data_dir": "/"}}, headers=h)
    assert r.status_code == 422 and "data_dir is set by the service" in detail(r)
    r = client.post("/admin/meta-train", json={"setting": "synthetic", "method": "magic"}, headers=h)
    assert r.status_code == 422 and "body.method" in detail(r)
    assert client.get("/admin/jobs/nope", headers=h).status_code == 404
    assert client.post("/admin/checkpoints/v0009-none/activate", headers=h).status_code == 404


def test_redis_down_is_503_not_500(redis_servers):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from conftest import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(create_app(settings(redis_url=dead, cache_redis_url=dead))) as c:
        r = c.post("/tasks", json={**sentiment(tag="down"), "adaptation": {"mode": "none"}}, headers=auth())
        assert r.status_code == 503 and "Redis is unavailable" in r.json()["detail"]
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["redis"] is False


def test_meta_train_bad_hyperparameter_types_are_422(client):
    h = auth(ADMIN_KEY)
    for hp in ({"steps": "many"}, {"steps": 2.5}, {"tasks_per_step": None}, {"nonsense": 1}):
        r = client.post("/admin/meta-train", json={"setting": "synthetic", "hyperparameters": hp}, headers=h)
        assert r.status_code == 422, (hp, r.text)
