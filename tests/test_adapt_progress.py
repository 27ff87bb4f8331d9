"""An adaptation as the worker runs it (worker/tasks.py `_adapt`, the real inner loop on the tiny model,
records in a real Redis): its ETA in the task status, the time budget, and DELETE stopping it."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from app.routes.tasks import info
from contract.store import Store
from model.adapt import adapt
from model.recipe import Recipe
from worker import tasks as worker_tasks

from conftest import RECORDS_PORT, wait_for
from helpers import sentiment_task, tiny_lm

RECIPE = Recipe(epochs=4, batch_size=1)  # 40 steps over the 10 demonstrations
PLANNED = RECIPE.steps_for(10)
REQUEST = SimpleNamespace(url_for=lambda name, task_id: f"/tasks/{task_id}")


class Runtime:
    """What `_adapt` needs of worker.runtime.Runtime: the store, the settings, and an adaptation
    whose steps are slowed to be watched."""

    def __init__(self, store: Store, budget_s: float, delay_s: float = 0.05):
        self.store, self.s, self.delay_s = store, SimpleNamespace(adapt_time_budget_s=budget_s), delay_s
        self.steps: list[int] = []

    def run_adaptation(self, rec, on_step=None, should_stop=None):
        def slow(i, n, loss):
            self.steps.append(i)
            time.sleep(self.delay_s)
            on_step(i, n, loss)

        return adapt(LM, sentiment_task(), RECIPE, on_step=slow, time_budget_s=self.s.adapt_time_budget_s,
                     should_stop=should_stop)

    def store_weights(self, rec, result):
        return {"weights_key": f"test/{rec['id']}"}

    def drop_weights(self, rec):
        pass


LM = None


@pytest.fixture(scope="module", autouse=True)
def tiny():
    global LM
    LM = tiny_lm()


@pytest.fixture
def store(redis_servers, monkeypatch):
    monkeypatch.setattr(worker_tasks, "_weights_size", lambda rt, rec, pointer: 0)  # no blob stores here
    st = Store.from_url(f"redis://127.0.0.1:{RECORDS_PORT}/9")
    st.r.flushdb()
    yield st
    st.r.flushdb()


def record(store: Store, tid: str) -> dict:
    store.create_task(tid, "tenant-a", {"status": "adapting", "run": "r1", "worker": "w", "steps": PLANNED,
                                        "n_steps": PLANNED, "epochs": RECIPE.epochs_for(10), "mode": "lora",
                                        "lr": 3e-3, "checkpoint": "base", "step": 0})
    return store.task(tid)


def run(rt: Runtime, rec: dict) -> tuple[threading.Thread, list[str]]:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(worker_tasks._adapt(rt, rec, "r1")))
    t.start()
    return t, out


def test_status_reports_an_eta_while_adapting_and_none_after(store):
    rt = Runtime(store, budget_s=300)
    t, out = run(rt, record(store, "eta"))
    rec = wait_for(lambda: (r := store.task("eta"))["step"] >= 3 and r, 60, "three steps")
    progress = info(rec, REQUEST).progress
    assert progress.steps == PLANNED and progress.eta_s is not None
    assert 0 < progress.eta_s <= 300  # (steps left) x the mean step time so far, within the budget
    t.join(60)
    done = info(store.task("eta"), REQUEST)
    assert out == ["ready"] and done.status == "ready"
    assert (done.progress.step, done.progress.eta_s, done.progress.stopped) == (PLANNED, None, None)


def test_time_budget_ends_the_adaptation_ready_with_the_steps_taken(store):
    rt = Runtime(store, budget_s=0.5)
    t, out = run(rt, record(store, "budget"))
    t.join(60)
    done = info(store.task("budget"), REQUEST)
    assert out == ["ready"] and done.status == "ready"
    assert 1 <= done.progress.step < PLANNED and done.progress.steps == PLANNED
    assert done.progress.stopped == "time_budget" and done.progress.step == len(rt.steps)


def test_deleting_the_task_stops_its_running_adaptation(store):
    """DELETE /tasks/{id} removes the record (app/services/tasks.py delete); the worker's next
    progress write finds it gone and the loop ends after the step under way."""
    rt = Runtime(store, budget_s=300)
    t, out = run(rt, record(store, "cancel"))
    wait_for(lambda: store.task("cancel")["step"] >= 2, 60, "two steps")
    assert store.delete_task("cancel", "tenant-a")
    at_delete = len(rt.steps)
    t.join(30)
    assert not t.is_alive() and out == ["deleted"]
    assert len(rt.steps) <= at_delete + 1 < PLANNED  # at most the step under way ran on
    assert store.task("cancel") is None


def test_retrieval_embeddings_travel_with_the_weights_and_not_into_the_params():
    import torch

    from model import weights
    from worker.runtime import EMBEDDINGS, _split, _with_embeddings

    params, emb = {"w": torch.ones(2, 2)}, torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    tensors, meta = weights.from_bytes_meta(weights.to_bytes(_with_embeddings(params, emb), {"prior": "null"}))
    assert EMBEDDINGS in tensors
    got, back = _split(tensors)
    assert set(got) == {"w"} and torch.allclose(back, emb, atol=1e-3) and meta == {"prior": "null"}
    assert _split(dict(params)) == (params, None)


def test_worker_predicts_with_retrieval_where_the_demonstrations_do_not_fit():
    """Runtime.predict takes the retrieval path (embeddings computed where the entry has none) and
    answers as model.scoring.predict does with them; a task that fits keeps its cached prefix."""
    from model.prompts import Formatter
    from model.recipe import DEFAULT
    from model.scoring import predict
    from model.task import Query
    from worker.runtime import Entry, Runtime as WorkerRuntime

    task = sentiment_task()
    rt = WorkerRuntime.__new__(WorkerRuntime)  # the model and settings only: no Redis, no blob stores
    rt.lm, rt.fmt, rt.s = LM, Formatter(LM.encode, budget=40), SimpleNamespace(max_new_tokens=4)
    entry = Entry({}, {})
    rt.task, rt.ensure_weights = (lambda rec: task), (lambda rec: entry)
    recipe = DEFAULT.but(retrieve=4)  # fewer than the 10 demonstrations: there is a choice to make
    rec = {"recipe": recipe.to_dict()}
    queries = [Query(input=d.input) for d in task.demonstrations[:4]]
    got = rt.predict(rec, queries)
    assert entry.embeddings is not None and not entry.prefixes  # retrieved: no shared prefix kept
    assert entry.head is not None  # the default recipe's head, fit from the task's demonstrations
    want = predict(LM, task, queries, recipe=recipe, fmt=rt.fmt, embeddings=entry.embeddings, head=entry.head)
    assert [p.scores for p in got] == [p.scores for p in want]
    rt.fmt = Formatter(LM.encode)  # everything fits: the fixed prompt, its prefix cached as before
    rt.predict(rec, queries)
    assert list(entry.prefixes) == [len(task.demonstrations)]


def test_a_batch_answers_each_caller_and_a_bad_input_fails_only_its_own(monkeypatch):
    """worker.tasks.predict: the callers' queries (as the API sends them) scored as one batch, each
    caller its own answers; one caller's query over the operator's limits is a 422 for it alone."""
    from model.prompts import Formatter
    from model.recipe import DEFAULT
    from worker.runtime import Entry, Runtime as WorkerRuntime

    task = sentiment_task()
    rt = WorkerRuntime.__new__(WorkerRuntime)  # the model and settings only: no Redis, no blob stores
    rt.lm, rt.fmt = LM, Formatter(LM.encode)
    rt.s = SimpleNamespace(max_new_tokens=4, max_demonstrations=5000, max_options=32, max_text_tokens=256,
                           max_text_chars=20)
    entry = Entry({}, {})
    rt.task, rt.ensure_weights = (lambda rec: task), (lambda rec: entry)
    rt.store = SimpleNamespace(count=lambda *a: None)
    rec = {"recipe": DEFAULT.to_dict()}
    got: list[dict] = []
    monkeypatch.setattr(worker_tasks.replies, "answer", lambda reply, task_id, fn: got.append(fn(rt, rec)))
    first, second = [{"input": "what a joy"}], [{"input": "so dull", "options": ["yes", "no"]}]
    worker_tasks.predict("t", [first, second], "r")
    worker_tasks.predict("t", [first, [{"input": "x" * 21}], second], "r")
    together, apart = got[0]["groups"], got[1]["groups"]
    assert apart[1]["status"] == 422 and "21 characters; the limit is 20" in apart[1]["error"]
    for a, b in zip(together, [apart[0], apart[2]]):
        (pa,), (pb,) = a["predictions"], b["predictions"]
        assert pa["output"] == pb["output"] and pa["scores"] == pytest.approx(pb["scores"], abs=1e-4)
    assert set(together[1]["predictions"][0]["scores"]) == {"yes", "no"}
