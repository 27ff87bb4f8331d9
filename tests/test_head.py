"""The bag-of-words head (model.head): it learns a task from all its demonstrations, joins the
language model's scores as log-probabilities, and overrules a model that knows nothing of the task."""

from __future__ import annotations

import math
import random

import pytest

from model.head import Head, combine
from model.recipe import DEFAULT, ICL
from model.scoring import predict
from model.task import Example, Query, Task

from helpers import tiny_lm

TEAMS = {"billing": ["invoice", "refund", "charge", "payment"], "network": ["router", "wifi", "latency", "packet"],
         "access": ["password", "login", "token", "account"]}


def tickets(n: int, seed: int = 0) -> list[Example]:
    """Support tickets whose team is told by a keyword among filler words."""
    rng = random.Random(seed)
    filler = ["please", "help", "today", "urgent", "again", "the", "my", "is", "not", "working"]
    out = []
    for i in range(n):
        team = list(TEAMS)[i % 3]
        words = rng.sample(filler, 4) + [rng.choice(TEAMS[team])]
        rng.shuffle(words)
        out.append(Example(input=" ".join(words), output=team))
    return out


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def test_the_head_learns_the_keywords_from_every_demonstration():
    task = Task(demonstrations=tickets(60), options=list(TEAMS))
    head = Head.fit(task)
    held_out = tickets(30, seed=1)
    got = head.log_probs([e.input for e in held_out], task.options)
    right = sum(max(lp, key=lp.__getitem__) == e.output for lp, e in zip(got, held_out))
    assert right >= 27
    for lp in got:  # a distribution over the options
        assert sum(math.exp(v) for v in lp.values()) == pytest.approx(1.0, abs=1e-6)


def test_no_head_where_there_is_nothing_to_separate():
    assert Head.fit(Task(demonstrations=[Example(input="a", output="x"), Example(input="b", output="x")],
                         options=["x", "y"])) is None
    assert Head.fit(Task(demonstrations=tickets(6))) is None  # generation: no options


def test_an_option_no_demonstration_shows_gets_the_lowest_seen_log_probability():
    task = Task(demonstrations=[e for e in tickets(30) if e.output != "access"], options=list(TEAMS))
    lp = Head.fit(task).log_probs(["my wifi router is slow"], task.options)[0]
    assert lp["access"] == min(lp["billing"], lp["network"])
    assert lp["network"] > lp["billing"]


def test_combine_is_the_models_log_softmax_plus_the_weighted_head():
    scores, head = {"a": -1.0, "b": -3.0}, {"a": math.log(0.1), "b": math.log(0.9)}
    out = combine(scores, head, 2.0)
    norm = math.log(math.exp(-1.0) + math.exp(-3.0))
    assert out["a"] == pytest.approx(-1.0 - norm + 2 * math.log(0.1))
    assert out["b"] == pytest.approx(-3.0 - norm + 2 * math.log(0.9))
    assert max(out, key=out.get) == "b"  # the head overrules a 2-nat margin at weight 2
    assert combine(scores, head, 0.0)["a"] > combine(scores, head, 0.0)["b"]  # weight 0: the model alone


def test_predict_with_the_head_answers_what_the_untrained_model_cannot(lm):
    task = Task(demonstrations=tickets(90), options=list(TEAMS))
    queries = [Query(input=e.input) for e in tickets(30, seed=2)]
    golds = [e.output for e in tickets(30, seed=2)]
    alone = predict(lm, task, queries, recipe=ICL)
    with_head = predict(lm, task, queries, recipe=ICL.but(head=1.0), head=Head.fit(task))
    right = lambda preds: sum(p.output == g for p, g in zip(preds, golds))  # noqa: E731
    assert right(with_head) >= 27 and right(with_head) > right(alone)
    # a query with its own options is the model's alone: the head knows only the task's labels
    own = Query(input="router down", options=["yes", "no"])
    a, b = predict(lm, task, [own], recipe=ICL), predict(lm, task, [own], recipe=ICL.but(head=1.0), head=Head.fit(task))
    assert a[0].scores == b[0].scores


def test_the_default_recipe_has_the_head_and_in_context_prediction_has_not():
    assert DEFAULT.head > 0 and ICL.head == 0
    with pytest.raises(ValueError, match="head"):
        DEFAULT.but(head=-1.0)
