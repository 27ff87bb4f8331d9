"""Retrieval of demonstrations per query (model/retrieval.py, Recipe.retrieve), the bounded calibration
sample, and the adaptation's time budget and stop callback, on the tiny model."""

import pytest
import torch

from model.adapt import adapt
from model.calibration import CALIBRATION_DEMOS, calibration_sample, demo_scores
from model.prompts import Formatter
from model.recipe import DEFAULT, Recipe
from model.retrieval import applies, choose, contexts, embed, grouped, shown
from model.scoring import predict
from model.task import Task

from helpers import SENTIMENT, sentiment_task, tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


def test_choose_takes_the_nearest_round_robin_over_labels():
    # demonstrations 0-3 are label a (the four most similar), 4-5 label b
    sims = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.1])
    labels = ["a", "a", "a", "a", "b", "b"]
    sizes = [1] * 6
    assert choose(sims, labels, sizes, k=2, room=100) == (0, 4)  # the nearest of each label
    assert choose(sims, labels, sizes, k=4, room=100) == (0, 1, 4, 5)  # balanced, not the top 4
    assert choose(sims, labels, sizes, k=4, room=100, exclude=0) == (1, 2, 4, 5)
    assert choose(sims, [None] * 6, sizes, k=3, room=100) == (0, 1, 2)  # one group: plain nearest
    # what does not fit the room is skipped for the next of its label
    assert choose(sims, labels, [5, 1, 1, 1, 5, 1], k=2, room=3) == (1, 5)


def test_retrieval_picks_the_demonstration_equal_to_the_query(lm):
    task = sentiment_task()
    fmt = Formatter(lm.encode, budget=40)
    emb = embed(lm, [d.input for d in task.demonstrations])
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(emb)))
    queries = [task.demonstrations[i] for i in (2, 7)]
    chosen = contexts(lm, fmt, task, DEFAULT.but(retrieve=2), queries, [8, 8], emb)
    for q, c in zip(queries, chosen):
        labels = {task.demonstrations[i].output for i in c}
        assert task.demonstrations.index(q) in c and labels == {"positive", "negative"}, c
    # excluded (calibration's leave-one-out), it is never chosen
    chosen = contexts(lm, fmt, task, DEFAULT.but(retrieve=2), queries, [8, 8], emb, exclude=[2, 7])
    assert 2 not in chosen[0] and 7 not in chosen[1]


def test_with_every_demonstration_fitting_scores_are_exactly_the_fixed_prompts(lm):
    task = sentiment_task()
    fmt = Formatter(lm.encode)
    assert not applies(fmt, task, DEFAULT, 20)
    fixed, retrieving = DEFAULT.but(retrieve=None), DEFAULT.but(retrieve=4)
    a = predict(lm, task, task.demonstrations, recipe=fixed, fmt=fmt)
    b = predict(lm, task, task.demonstrations, recipe=retrieving, fmt=fmt)
    assert [p.scores for p in a] == [p.scores for p in b]
    da, db = demo_scores(lm, task, None, fixed, fmt), demo_scores(lm, task, None, retrieving, fmt)
    assert torch.equal(da.sums, db.sums)
    ra = adapt(lm, task, fixed.but(epochs=2), fmt=fmt)
    rb = adapt(lm, task, retrieving.but(epochs=2), fmt=fmt)
    assert rb.embeddings is None and ra.prior == rb.prior and ra.losses == rb.losses


def test_grouped_prefixes_score_as_each_query_alone_with_its_context(lm):
    task = sentiment_task()
    fmt = Formatter(lm.encode, budget=40)  # about 4 of the 10 demonstrations fit
    recipe = DEFAULT.but(retrieve=3)
    queries = task.demonstrations[:6] + task.demonstrations[:2]  # repeated: two queries per set at least
    rows = [r for q in queries for r in fmt.candidates(q.input, task.options)]
    assert applies(fmt, task, recipe, max(len(r.ctx) + len(r.target) for r in rows))
    emb = embed(lm, [d.input for d in task.demonstrations])
    together = predict(lm, task, queries, recipe=recipe, fmt=fmt, embeddings=emb)
    sizes = [max(len(r.ctx) + len(r.target) for r in fmt.candidates(q.input, task.options)) for q in queries]
    chosen = contexts(lm, fmt, task, recipe, queries, sizes, emb)
    groups = grouped(chosen)
    assert 1 < len(groups) < len(queries)
    for q, c, got in zip(queries, chosen, together):
        (alone,) = predict(lm, shown(task, c), [q], recipe=recipe.but(retrieve=None), fmt=fmt)
        assert got.scores == pytest.approx(alone.scores, abs=1e-5)
    # and differs from the fixed prompt's first demonstrations
    fixed = predict(lm, task, queries, recipe=recipe.but(retrieve=None), fmt=fmt)
    assert [p.scores for p in fixed] != [p.scores for p in together]


def test_calibration_scores_a_bounded_label_balanced_sample():
    demos = [{"input": f"text {i}", "output": "a" if i % 3 else "b"} for i in range(600)]
    task = Task(demonstrations=demos, options=["a", "b"])
    sample = calibration_sample(task, task.demonstrations)
    assert len(sample) == CALIBRATION_DEMOS
    assert sum(d.output == "a" for d in sample) == sum(d.output == "b" for d in sample) == CALIBRATION_DEMOS // 2
    assert sample == sorted(sample, key=task.demonstrations.index)  # the task's order
    few = sentiment_task()
    assert calibration_sample(few, few.demonstrations) == few.demonstrations


def test_time_budget_stops_after_the_step_under_way_and_says_so(lm):
    task = sentiment_task()
    recipe = Recipe(epochs=8, batch_size=2)
    planned = recipe.steps_for(len(SENTIMENT))
    a = adapt(lm, task, recipe, time_budget_s=0.0)  # spent at once: the first step runs, no other
    assert (a.steps, a.planned, a.stopped, len(a.losses)) == (1, planned, "time_budget", 1)
    assert a.epochs == pytest.approx(recipe.epochs_for(len(SENTIMENT)) / planned)
    full = adapt(lm, task, recipe, time_budget_s=3600)
    assert (full.steps, full.stopped) == (planned, None)


def test_should_stop_ends_the_loop_at_the_step_it_says(lm):
    seen = []
    a = adapt(lm, sentiment_task(), Recipe(epochs=8, batch_size=2), on_step=lambda i, n, loss: seen.append(i),
              should_stop=lambda: len(seen) >= 3)
    assert seen == [1, 2, 3] and (a.steps, a.stopped) == (3, "stopped")


def test_no_more_demonstrations_than_retrieve_keeps_the_fixed_prompt(lm):
    """k <= retrieve (the default 16 at k=16, the measured recipe): nothing to choose among, so the
    fixed prompt applies even where the demonstrations do not all fit."""
    task = sentiment_task()
    tight = Formatter(lm.encode, budget=40)  # not all 10 fit
    assert not applies(tight, task, DEFAULT.but(retrieve=10), 8)
    assert applies(tight, task, DEFAULT.but(retrieve=9), 8)


def test_past_its_deadline_retrieved_calibration_stops_label_balanced(lm):
    """Under retrieval each demonstration scored costs a prefix: past the adaptation's deadline,
    calibration stops once MIN_CALIBRATION_DEMOS are scored, taken in turns over the labels, and
    their scores are those the unhurried run gives them."""
    from model.calibration import MIN_CALIBRATION_DEMOS, round_robin
    from model.task import Example

    demos = [Example(input=f"{'good' if i % 4 else 'bad'} film number {i}", output="positive" if i % 4 else "negative")
             for i in range(80)]  # 60 positive, 20 negative
    task = Task(demonstrations=demos, options=["positive", "negative"])
    fmt, recipe = Formatter(lm.encode, budget=40), DEFAULT.but(retrieve=3)
    every = demo_scores(lm, task, None, recipe, fmt)
    hurried = demo_scores(lm, task, None, recipe, fmt, deadline=0.0)  # long past
    assert len(every.demos) == 80 and MIN_CALIBRATION_DEMOS <= len(hurried.demos) < 40
    labels = [d.output for d in hurried.demos]
    assert abs(labels.count("positive") - labels.count("negative")) <= 2  # not 3:1 as the task is
    where = [demos.index(d) for d in hurried.demos]
    assert torch.allclose(hurried.sums, every.sums[where])
    assert sorted(round_robin(task, demos)) == list(range(80))
