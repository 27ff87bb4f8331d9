"""End to end through a real Redis and a real Celery worker (tiny model): create, adapt, predict,
deduplicate, evict and re-adapt, export the adapter, delete, metrics and readiness."""

from __future__ import annotations

import io
import zipfile

import pytest
import redis

from conftest import KEY, OTHER_KEY, auth, sentiment, wait_status
from contract.store import task_weights_key

pytestmark = pytest.mark.usefixtures("worker")


def create(client, body: dict, key: str = KEY):
    r = client.post("/tasks", json=body, headers=auth(key))
    assert r.status_code in (200, 202), r.text
    return r


def test_create_ready_predict(client):
    r = create(client, {**sentiment(tag="e2e"), "adaptation": {"mode": "lora", "steps": 3}})
    assert r.status_code == 202
    task = r.json()
    assert task["status"] in ("queued", "adapting", "ready")
    assert r.headers["location"].endswith(f"/tasks/{task['id']}")
    done = wait_status(client, task["id"])
    assert done["progress"]["step"] == 3 and done["progress"]["steps"] == 3
    assert done["progress"]["loss_before"] is not None and done["progress"]["loss_after"] is not None
    assert done["checkpoint"] == "base" and done["started_at"] <= done["finished_at"]

    r = client.post("/predict", json={"task_id": task["id"], "inputs": ["what a joy", {"input": "so dull"}]}, headers=auth())
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["input"] for p in preds] == ["what a joy", "so dull"]
    for p in preds:
        assert p["output"] in ("positive", "negative")
        scores = {s["option"]: s["score"] for s in p["scores"]}
        assert set(scores) == {"positive", "negative"} and max(scores, key=scores.get) == p["output"]

    # per-query options override the task's
    r = client.post("/predict", json={"task_id": task["id"], "inputs": [{"input": "hm", "options": ["yes", "no", "maybe"]}]},
                    headers=auth())
    assert r.status_code == 200, r.text
    assert {s["option"] for s in r.json()["predictions"][0]["scores"]} == {"yes", "no", "maybe"}


def test_generation_task_returns_text(client):
    body = {"demonstrations": [{"input": "capital of france", "output": "paris"}, {"input": "capital of italy", "output": "rome"}],
            "adaptation": {"mode": "none"}}
    task = create(client, body).json()
    assert task["status"] == "ready"  # in context only: nothing to adapt
    r = client.post("/predict", json={"task_id": task["id"], "inputs": ["capital of spain"]}, headers=auth())
    assert r.status_code == 200, r.text
    p = r.json()["predictions"][0]
    assert isinstance(p["output"], str) and p["scores"] is None


def test_same_demonstrations_twice_is_one_task(client, records):
    body = {**sentiment(tag="dedupe"), "adaptation": {"steps": 2}}
    first = create(client, body)
    second = create(client, body)
    assert first.status_code == 202 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    wait_status(client, first.json()["id"])
    third = create(client, body)
    assert third.status_code == 200 and third.json()["status"] == "ready"
    assert int(records.hget(f"ms:task:{first.json()['id']}", "attempts")) == 1
    # different settings, or another tenant: another task
    other = create(client, {**body, "adaptation": {"steps": 1}})
    assert other.json()["id"] != first.json()["id"]
    theirs = create(client, body, key=OTHER_KEY)
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


def test_predict_409_until_ready_then_wait(client):
    task = create(client, {**sentiment(tag="wait"), "adaptation": {"steps": 40}}).json()
    r = client.post("/predict", json={"task_id": task["id"], "inputs": ["a joy"]}, headers=auth())
    if r.status_code == 409:  # the usual case: 40 steps take a while
        assert "not ready" in r.json()["detail"]
    r = client.post("/predict", json={"task_id": task["id"], "inputs": ["a joy"], "wait_s": 60}, headers=auth())
    assert r.status_code == 200, r.text


def metric(client, name: str) -> float:
    """The sum of a family's samples over its labels (each worker has its own)."""
    lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith((name + " ", name + "{"))]
    if not lines:
        raise AssertionError(f"{name} not in /metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def weights_head(client, task_id: str) -> str:
    """The Redis key of the head of a task's weights in the cache (contract/blobs.py)."""
    return "ms:blob:" + task_weights_key(client.app.state.store.task(task_id))


def test_evicted_weights_are_adapted_again_on_predict(client, cache):
    task = create(client, {**sentiment(tag="evict"), "adaptation": {"steps": 2}}).json()
    wait_status(client, task["id"])
    key = weights_head(client, task["id"])
    assert cache.exists(key)
    before = client.post("/predict", json={"task_id": task["id"], "inputs": ["a joy"]}, headers=auth()).json()
    # Push the task out of the worker's in-process LRU (size 2) with two other tasks...
    for tag in ("evict-a", "evict-b"):
        other = create(client, {**sentiment(tag=tag), "adaptation": {"steps": 1}}).json()
        r = client.post("/predict", json={"task_id": other["id"], "inputs": ["x"], "wait_s": 60}, headers=auth())
        assert r.status_code == 200, r.text
    # ...and out of the cache Redis by memory pressure: allkeys-lru evicts the least recently used.
    cache.config_set("maxmemory", "4mb")
    try:
        blob = b"x" * 100_000
        for i in range(200):
            cache.set(f"filler:{i}", blob)
            if not cache.exists(key):
                break
        assert not cache.exists(key), "the cache Redis did not evict the weights"
    finally:
        cache.config_set("maxmemory", "64mb")
        for k in cache.keys("filler:*"):
            cache.delete(k)
    readapted = metric(client, "mamlserve_readaptations_total")
    r = client.post("/predict", json={"task_id": task["id"], "inputs": ["a joy"]}, headers=auth())
    assert r.status_code == 200, r.text
    assert metric(client, "mamlserve_readaptations_total") == readapted + 1
    assert cache.exists(key)  # stored again
    # same demonstrations, same seed: the very same weights, so the same scores
    scores = lambda body: [s["score"] for s in body["predictions"][0]["scores"]]  # noqa: E731
    assert scores(r.json()) == pytest.approx(scores(before), abs=1e-4)

def test_adapter_is_a_peft_archive(client, tmp_path):
    from peft import PeftModel

    from model.tiny import tiny_model

    task = create(client, {**sentiment(tag="peft"), "adaptation": {"steps": 2}}).json()
    wait_status(client, task["id"])
    r = client.get(f"/tasks/{task['id']}/adapter", headers=auth())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path)
    model = PeftModel.from_pretrained(tiny_model(), tmp_path)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # adapted: B moved off its zero init


def test_full_mode_weights_are_in_the_cache_redis_under_the_configuration(client, cache):
    task = create(client, {**sentiment(tag="full"), "adaptation": {"mode": "full", "steps": 1}}).json()
    wait_status(client, task["id"])
    rec = client.app.state.store.task(task["id"])
    fp = client.app.state.fingerprint
    assert rec["fingerprint"] == fp and rec["weights_key"] == f"weights/{fp}/base/{rec['hash']}"
    assert cache.exists(weights_head(client, task["id"])) and "weights_path" not in rec
    r = client.post("/predict", json={"task_id": task["id"], "inputs": ["a joy"]}, headers=auth())
    assert r.status_code == 200, r.text
    r = client.get(f"/tasks/{task['id']}/adapter", params={"format": "lora"}, headers=auth())
    assert r.status_code == 409 and "full mode" in r.json()["detail"]  # a LoRA cannot hold full-mode weights


def test_list_and_delete(client, cache):
    task = create(client, {**sentiment(tag="delete"), "adaptation": {"steps": 1}}).json()
    wait_status(client, task["id"])
    page = client.get("/tasks", params={"limit": 100}, headers=auth()).json()
    assert task["id"] in [t["id"] for t in page["items"]] and page["total"] >= 1
    first = client.get("/tasks", params={"limit": 1}, headers=auth()).json()
    assert len(first["items"]) == 1 and (first["next_offset"] == 1 or first["total"] == 1)
    key = weights_head(client, task["id"])
    assert cache.exists(key)
    assert client.delete(f"/tasks/{task['id']}", headers=auth()).status_code == 204
    assert client.get(f"/tasks/{task['id']}", headers=auth()).status_code == 404
    assert not cache.exists(key)
    assert task["id"] not in [t["id"] for t in client.get("/tasks", params={"limit": 100}, headers=auth()).json()["items"]]


def test_readyz_and_metrics(client):
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ready"] and body["workers"] and body["models"] and body["mismatched"] == []
    assert body["fingerprint"] == client.app.state.fingerprint and set(body["queues"]) == {"predict", "adapt", "meta"}
    assert client.get("/healthz").json() == {"status": "ok"}
    text = client.get("/metrics").text
    for name in ("http_request_duration_seconds", "mamlserve_queue_depth", "mamlserve_adaptation_seconds_count",
                 "mamlserve_weights_hit_memory_total"):
        assert name in text
    assert metric(client, "mamlserve_adaptation_seconds_count") >= 1
    assert metric(client, "mamlserve_predict_seconds_sum") > 0 and metric(client, "mamlserve_predict_seconds_count") >= 1


def test_each_call_lands_in_exactly_one_queue(redis_servers):
    """A shared routing key would copy every message into all queues (and run everything thrice):
    adaptations and meta-training go to their configuration's queue, a prediction to one worker's."""
    from conftest import RECORDS_PORT, settings
    from contract.queues import direct, make_celery, queue

    url = f"redis://127.0.0.1:{RECORDS_PORT}/7"  # a database no worker consumes
    celery = make_celery(settings(redis_url=url))
    db = redis.Redis.from_url(url)
    lists = [queue("adapt", "fp1"), queue("meta", "fp1"), queue("adapt", "fp2"), direct("w1@host"), direct("w2@host")]
    try:
        for i, (name, q) in enumerate(zip(("worker.tasks.adapt", "worker.tasks.meta_train", "worker.tasks.adapt",
                                           "worker.tasks.predict", "worker.tasks.predict"), lists)):
            celery.send_task(name, args=["x"], queue=q, ignore_result=True)
            assert [db.llen(x.name) for x in lists] == [int(j == i) for j in range(len(lists))]
            db.delete(q.name)
    finally:
        db.flushdb()


def test_concurrent_predictions_share_a_batch_and_get_their_own_answers(client):
    from concurrent.futures import ThreadPoolExecutor

    task = create(client, {**sentiment(tag="batch"), "adaptation": {"steps": 1}}).json()
    wait_status(client, task["id"])
    texts = [f"review number {i}: {'loved it' if i % 2 else 'hated it'}" for i in range(8)]

    def ask(text):
        r = client.post("/predict", json={"task_id": task["id"], "inputs": [text]}, headers=auth())
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]

    alone = {t: ask(t) for t in texts[:2]}
    batches = metric(client, "mamlserve_predict_batches_total")
    with ThreadPoolExecutor(len(texts)) as pool:
        together = list(pool.map(ask, texts))
    assert [p["input"] for p in together] == texts
    assert metric(client, "mamlserve_predict_batches_total") - batches < len(texts)  # some calls were merged
    for p in together[:2]:  # batched or not, the same answer
        assert [s["score"] for s in p["scores"]] == pytest.approx([s["score"] for s in alone[p["input"]]["scores"]], abs=1e-4)


def test_a_task_with_no_knobs_gets_the_recipe_and_answers_an_input_alike_in_any_batch(client):
    """Nothing but demonstrations and options: the default recipe, its steps following the number of
    demonstrations, progress in epochs; the stored calibration makes an input's answer independent
    of whatever else is in its /predict call."""
    from model.recipe import DEFAULT

    task = create(client, sentiment(8, tag="no-knobs")).json()
    assert task["recipe"] == DEFAULT.to_dict() and task["mode"] == "lora"
    assert task["steps"] == DEFAULT.steps_for(8) and task["epochs"] == pytest.approx(DEFAULT.epochs)
    done = wait_status(client, task["id"])
    assert done["progress"]["step"] == done["steps"] and done["progress"]["epoch"] == pytest.approx(done["epochs"], abs=1e-3)

    def scores(inputs: list[str]) -> dict:
        r = client.post("/predict", json={"task_id": task["id"], "inputs": inputs}, headers=auth())
        assert r.status_code == 200, r.text
        return {s["option"]: s["score"] for s in r.json()["predictions"][0]["scores"]}

    alone = scores(["what a joy"])
    assert scores(["what a joy", "so dull", "hated it", "brilliant"]) == pytest.approx(alone, abs=1e-5)

    # a request's fields override the recipe's, and change the task
    more = create(client, {**sentiment(8, tag="no-knobs"), "adaptation": {"epochs": 2, "lr": 0.01}}).json()
    assert more["id"] != task["id"] and more["steps"] == DEFAULT.but(epochs=2).steps_for(8)
    assert more["recipe"]["lr"] == 0.01 and more["lr"] == 0.01

    # fewer demonstrations than the recipe trains on: nothing trained, yet ready and calibrated;
    # asking for epochs trains them anyway
    few = create(client, sentiment(DEFAULT.min_demos - 1, tag="few")).json()
    assert few["steps"] == 0 and few["epochs"] == 0
    done = wait_status(client, few["id"])
    r = client.post("/predict", json={"task_id": few["id"], "inputs": ["what a joy"]}, headers=auth())
    assert r.status_code == 200 and r.json()["predictions"][0]["output"] in ("positive", "negative")
    asked = create(client, {**sentiment(DEFAULT.min_demos - 1, tag="few"), "adaptation": {"epochs": 2}}).json()
    assert asked["steps"] == DEFAULT.but(epochs=2, min_demos=0).steps_for(DEFAULT.min_demos - 1) > 0


def test_the_list_filters_by_status_and_responses_say_what_they_cost(client):
    ready = create(client, {**sentiment(tag="filter-ready"), "adaptation": {"steps": 1}}).json()
    wait_status(client, ready["id"])
    slow = create(client, {**sentiment(tag="filter-slow"), "adaptation": {"steps": 60}}).json()

    def ids(**params) -> list[str]:
        r = client.get("/tasks", params={"limit": 100, **params}, headers=auth())
        assert r.status_code == 200, r.text
        return [t["id"] for t in r.json()["items"]]

    pending = ids(status=["queued", "adapting"])
    assert ready["id"] in ids(status="ready") and ready["id"] not in pending
    assert slow["id"] in pending or slow["id"] in ids(status="ready")  # it may have finished in between
    # tasks of this module may become ready meanwhile (never the other way): the total lies between
    before = len(ids(status="ready"))
    page = client.get("/tasks", params={"status": "ready", "limit": 1}, headers=auth()).json()
    assert len(page["items"]) == 1 and before <= page["total"] <= len(ids(status="ready"))
    assert client.get("/tasks", params={"status": "sleeping"}, headers=auth()).status_code == 422
    # what a call cost: the tokens scored (each input with each option), the adaptation's worker seconds
    done = client.get(f"/tasks/{ready['id']}", headers=auth()).json()
    assert done["usage"]["adapt_seconds"] > 0
    r = client.post("/predict", json={"task_id": ready["id"], "inputs": ["a joy", "so dull"]}, headers=auth())
    count = client.app.state.count_tokens
    assert r.json()["usage"]["tokens_scored"] == sum(count(x) + count(o) for x in ("a joy", "so dull")
                                                     for o in ("positive", "negative"))


def test_the_bag_of_words_head_learns_from_every_demonstration_and_can_be_turned_off(client):
    """90 tickets whose team a keyword tells: the tiny random model cannot learn it in context, the
    default recipe's head (fit by the worker from the stored demonstrations) does; `head: 0` is the
    language model alone, and its answers differ."""
    from test_head import TEAMS, tickets

    body = {"demonstrations": [e.model_dump(include={"input", "output"}) for e in tickets(90)],
            "options": list(TEAMS), "adaptation": {"space": "none"}}
    held_out = tickets(30, seed=2)

    def answers(b: dict) -> list[str]:
        task = create(client, b).json()
        wait_status(client, task["id"])
        r = client.post("/predict", json={"task_id": task["id"], "inputs": [e.input for e in held_out]}, headers=auth())
        assert r.status_code == 200, r.text
        return [p["output"] for p in r.json()["predictions"]]

    with_head = answers(body)
    alone = answers({**body, "adaptation": {"space": "none", "head": 0}})
    right = lambda got: sum(a == e.output for a, e in zip(got, held_out))  # noqa: E731
    assert right(with_head) >= 27 and right(with_head) > right(alone)
    r = client.post("/tasks", json={**body, "adaptation": {"head": -1}}, headers=auth())
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "adaptation", "head"]
