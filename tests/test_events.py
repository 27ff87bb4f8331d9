"""GET /tasks/{id}/events: a task's status and progress as server-sent events until it is done,
against the API as deployed (uvicorn: a real stream) and a real worker."""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import KEY, OTHER_KEY, Api, sentiment


@pytest.fixture(scope="module")
def api(worker):
    server = Api(name="events-api")
    yield server.start()
    server.stop()


def events(c: httpx.Client, task_id: str, **params) -> list[tuple[str, dict]]:
    got, name = [], None
    with c.stream("GET", f"/tasks/{task_id}/events", params=params) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                got.append((name, json.loads(line[6:])))
    return got


def test_events_follow_a_task_from_queued_to_ready_and_end(api):
    with httpx.Client(base_url=api, headers={"X-API-Key": KEY}, timeout=120) as c:
        task = c.post("/tasks", json={**sentiment(tag="events"), "adaptation": {"steps": 60}}).json()
        got = events(c, task["id"])
        # from where it was when asked (60 steps take the tiny model about a second) to ready, progress only growing
        assert all(name == "status" for name, _ in got) and got[-1][1]["status"] == "ready"
        assert got[0][1]["status"] in ("queued", "adapting") and len(got) >= 2
        steps = [e["progress"]["step"] for _, e in got]
        assert steps == sorted(steps) and steps[-1] == 60
        assert got[-1][1]["usage"]["adapt_seconds"] > 0
        # a task already done: one event, then the stream ends
        assert [e["status"] for _, e in events(c, task["id"])] == ["ready"]
        assert c.get(f"/tasks/{task['id']}/events", headers={"X-API-Key": OTHER_KEY}).status_code == 404
        r = c.get(f"/tasks/{task['id']}/events", params={"timeout_s": 0})
        assert r.status_code == 422 and "timeout_s" in r.text
