"""The OpenAI-compatible endpoints (app/routes/v1.py) with the real `openai` package as the client,
against the API as deployed (uvicorn), a real Redis and a real worker (tiny model)."""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import KEY, OTHER_KEY, Api, sentiment, wait_for

GEN = {"demonstrations": [{"input": "capital of france", "output": "paris"}, {"input": "capital of italy", "output": "rome"}],
       "adaptation": {"epochs": 40, "lr": 0.03}}  # the tiny model says nothing until it has learnt to say something


@pytest.fixture(scope="module")
def api(worker):
    server = Api(name="v1-api")
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def http(api):
    with httpx.Client(base_url=api, headers={"X-API-Key": KEY}, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def oai(api):
    return openai.OpenAI(base_url=f"{api}/v1", api_key=KEY, max_retries=0, timeout=120)


def make(http, body: dict) -> str:
    r = http.post("/tasks", json=body)
    assert r.status_code in (200, 202), r.text
    tid = r.json()["id"]
    wait_for(lambda: http.get(f"/tasks/{tid}").json()["status"] == "ready", 120, "the task ready", every=0.1)
    return tid


@pytest.fixture(scope="module")
def options_task(http) -> str:
    return make(http, {**sentiment(tag="v1"), "adaptation": {"steps": 2}})


@pytest.fixture(scope="module")
def gen_task(http) -> str:
    return make(http, GEN)


def predict(http, tid: str, inputs: list[str]) -> list[dict]:
    r = http.post("/predict", json={"task_id": tid, "inputs": inputs})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_models_are_the_callers_ready_tasks(oai, http, options_task, api):
    queued = http.post("/tasks", json={**sentiment(tag="v1-queued"), "adaptation": {"steps": 60}}).json()["id"]
    ids = [m.id for m in oai.models.list()]
    assert options_task in ids and queued not in ids
    assert oai.models.retrieve(options_task).owned_by == "tenant-a"
    theirs = openai.OpenAI(base_url=f"{api}/v1", api_key=OTHER_KEY, max_retries=0)
    assert options_task not in [m.id for m in theirs.models.list()]
    with pytest.raises(openai.NotFoundError):
        theirs.models.retrieve(options_task)


def test_a_completion_is_the_predicted_option_with_its_scores(oai, http, options_task):
    inputs = ["what a joy", "so dull and boring"]
    want = predict(http, options_task, inputs)
    got = oai.completions.create(model=options_task, prompt=inputs, logprobs=2)
    assert [c.index for c in got.choices] == [0, 1]
    for c, p in zip(got.choices, want):
        scores = {s["option"]: s["score"] for s in p["scores"]}
        assert c.text == p["output"] and c.finish_reason == "stop"
        assert c.logprobs.tokens == [p["output"]] and c.logprobs.token_logprobs[0] == pytest.approx(scores[p["output"]])
        assert c.logprobs.top_logprobs[0] == pytest.approx(scores)  # both options, best first
    assert got.usage.prompt_tokens > 0 and got.usage.completion_tokens >= 2
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.usage.model_extra["tokens_scored"] > got.usage.prompt_tokens  # each input once per option


def test_chat_answers_the_last_user_message(oai, http, options_task):
    (want,) = predict(http, options_task, ["I loved it"])
    got = oai.chat.completions.create(model=options_task, logprobs=True, top_logprobs=2, messages=[
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "so dull"},
        {"role": "assistant", "content": "negative"}, {"role": "user", "content": [{"type": "text", "text": "I loved it"}]}])
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want["output"]
    scores = {s["option"]: s["score"] for s in want["scores"]}
    (tok,) = choice.logprobs.content
    assert tok.token == want["output"] and tok.logprob == pytest.approx(scores[want["output"]])
    assert {t.token: t.logprob for t in tok.top_logprobs} == pytest.approx(scores)
    # streamed: a role chunk, the option, the finish
    chunks = list(oai.chat.completions.create(model=options_task, stream=True, messages=[{"role": "user", "content": "I loved it"}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want["output"]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_generation_is_the_predict_answer_and_streams_the_same_text(oai, http, gen_task):
    prompts = ["capital of spain", "the quick brown fox", "what is the capital of germany", "a b c d"]
    texts = {p: oai.completions.create(model=gen_task, prompt=p).choices[0] for p in prompts}
    for p, c in texts.items():  # greedy by default: the answer /predict gives (which strips the text)
        assert c.text.strip() == predict(http, gen_task, [p])[0]["output"]
    p = max(prompts, key=lambda k: len(texts[k].text))
    full = texts[p].text
    assert len(full) >= 3, "no prompt makes the tiny model say three characters"
    pieces = list(oai.completions.create(model=gen_task, prompt=p, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in pieces if c.choices) == full
    assert [c.choices[0].finish_reason for c in pieces if c.choices][-1] == texts[p].finish_reason
    assert pieces[-1].choices == [] and pieces[-1].usage.completion_tokens > 0
    # stop: the text ends before the first stop sequence, which it does not include
    stop = full[1:3]
    cut = oai.completions.create(model=gen_task, prompt=p, stop=[stop, "zzzz"])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    chat = "".join(c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model=gen_task, stream=True, stop=stop, messages=[{"role": "user", "content": p}]) if c.choices)
    assert chat == full[: full.index(stop)]
    # max_tokens: at most that many, and "length" exactly when they ran out
    short = oai.completions.create(model=gen_task, prompt=p, max_tokens=2)
    assert short.usage.completion_tokens <= 2 and full.startswith(short.choices[0].text)
    assert (short.choices[0].finish_reason == "length") == (short.usage.completion_tokens == 2)
    # temperature: sampled, repeatable with a seed
    hot = [oai.completions.create(model=gen_task, prompt=p, temperature=1.5, seed=s, max_tokens=12).choices[0].text
           for s in (1, 1, 2, 3, 4)]
    assert hot[0] == hot[1] and len(set(hot)) > 1


def test_errors_come_in_openais_shape(oai, http, api, options_task, gen_task):
    bad = openai.OpenAI(base_url=f"{api}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.code == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="no-such-task", prompt="hi")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    theirs = openai.OpenAI(base_url=f"{api}/v1", api_key=OTHER_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        theirs.chat.completions.create(model=options_task, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=options_task, prompt="hi", extra_body={"best_of": 2})
    assert e.value.param == "best_of" and "not supported" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=gen_task, prompt="hi", logprobs=1)
    assert e.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=gen_task, prompt="hi", max_tokens=100_000)
    assert e.value.param == "max_tokens" and "the limit is" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=options_task, prompt="a " * 300)
    assert e.value.param == "prompt" and "tokens; the limit is" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=options_task, messages=[{"role": "system", "content": "hi"}])
    assert e.value.param == "messages"
    queued = http.post("/tasks", json={**sentiment(tag="v1-not-ready"), "adaptation": {"steps": 60}}).json()["id"]
    with pytest.raises(openai.ConflictError) as e:
        oai.completions.create(model=queued, prompt="hi")
    assert e.value.code == "model_not_ready" and e.value.response.headers["retry-after"]
    # X-API-Key works under /v1 too, and errors there are in the same shape
    r = http.post("/v1/completions", json={"model": options_task, "prompt": "hi", "temperature": "hot"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert http.post("/v1/completions", json={"model": options_task, "prompt": "hi"}).status_code == 200


def test_a_stream_the_client_drops_stops_the_worker_and_frees_the_slot(http, gen_task, records, api):
    before = {k for k in records.scan_iter("ms:cancel:*")}
    with httpx.Client(base_url=api, timeout=60) as c:
        with c.stream("POST", "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": gen_task, "prompt": "the quick", "stream": True, "max_tokens": 256,
                            "temperature": 1.0, "stop": []}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            next(r.iter_lines())  # the first event, then hang up
    wait_for(lambda: {k for k in records.scan_iter("ms:cancel:*")} - before, 15, "the API telling the worker to stop")
    wait_for(lambda: http.get("/usage").json()["waiting_predicts"]["used"] == 0, 15, "the call's slot given back")
    assert http.post("/v1/completions", json={"model": gen_task, "prompt": "hi"}).status_code == 200
