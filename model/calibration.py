"""Batch calibration: the options' prior (`prior_of`, `option_prior`) from the task's demonstrations
(up to `CALIBRATION_DEMOS`, label-balanced) scored as predictions score them, each leave-one-out
(`demo_scores`, `DemoScores`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import math
import time

import torch
from torch import Tensor

from model.lm import LM
from model.prefix import encode_prefix, in_context, row_logprobs
from model.prompts import Formatter, Row, longest
from model.recipe import Recipe
from model.retrieval import applies, contexts, embed, grouped, label_of, shown as chosen_task
from model.task import Example, Task

# Calibration scores each demonstration it uses, once per adaptation and again where a worker
# reloads an in-context task: at n = 5,000 that is 5,000 x options rows (and under retrieval as
# many prefixes). The prior is a mean over inputs, which a label-balanced sample of 256 estimates
# well at a bounded cost; below the cap every demonstration is scored, as before.
CALIBRATION_DEMOS = 256
# Under retrieval each demonstration scored encodes its own prefix (~1 s on SmolLM2, 2 cores), so
# an adaptation's time budget bounds calibration too: past its deadline, scoring stops once this
# many are scored (in round-robin order over the labels, so those scored stay label-balanced).
MIN_CALIBRATION_DEMOS = 32


def calibration_sample(task: Task, demos: Sequence[Example], cap: int = CALIBRATION_DEMOS) -> list[Example]:
    """All the demonstrations up to `cap`; beyond it the first `cap` in `round_robin` order
    (deterministic: the same prior on every worker), kept in the task's order."""
    if len(demos) <= cap:
        return list(demos)
    rank = round_robin(task, demos)
    return [d for d, r in zip(demos, rank) if r < cap]


def round_robin(task: Task, demos: Sequence[Example]) -> list[int]:
    """Each demonstration's rank when the labels take turns, in the order they first appear: the
    first of each label, then the second of each, ..."""
    lane: dict[str | None, int] = {}  # label -> its place in the turns
    taken: dict[str | None, int] = {}  # label -> how many of it so far
    turns = []
    for d in demos:
        label = label_of(task, d)
        lane.setdefault(label, len(lane))
        taken[label] = taken.get(label, 0) + 1
        turns.append((taken[label], lane[label]))
    order = sorted(range(len(demos)), key=turns.__getitem__)
    rank = [0] * len(demos)
    for r, i in enumerate(order):
        rank[i] = r
    return rank


def prior_of(scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Batch calibration (Zhou et al. 2023): each option's log of its mean probability over a
    batch of inputs, the probabilities being each input's softmax over its option scores.
    Subtracting it from the scores divides out the label prior the model holds whatever the
    input, which is what makes predictions collapse onto one or two labels."""
    if not scores:
        return {}
    opts = list(scores[0])
    table = torch.tensor([[s[o] for o in opts] for s in scores], dtype=torch.float64)
    mean = table.log_softmax(1).exp().mean(0)
    return {o: math.log(max(p, 1e-12)) for o, p in zip(opts, mean.tolist())}


def demo_spans(fmt: Formatter, demos: Sequence[Example], ids: list[int], used: int) -> dict[int, tuple[int, int]]:
    """Where each of the first `used` demonstrations sits in prefix `ids`, keyed by id(example):
    the span a query that is that very demonstration must not attend to."""
    spans: dict[int, tuple[int, int]] = {}
    end = len(ids)
    for d in reversed(demos[:used]):
        n = len(fmt.demo(d))
        spans[id(d)] = (end - n, end)
        end -= n
    return spans


@dataclass
class DemoScores:
    """Each demonstration's options scored as predictions score them, leave-one-out: row i of
    `sums`/`lengths` is demos[i], column j is options[j] (sum of log-probs, token count)."""

    demos: list[Example]
    options: list[str]
    sums: Tensor
    lengths: Tensor

    def scores(self, length_norm: bool) -> Tensor:
        return self.sums / self.lengths if length_norm else self.sums

    def prior(self, length_norm: bool) -> dict[str, float]:
        return prior_of([dict(zip(self.options, row)) for row in self.scores(length_norm).tolist()])


@torch.no_grad()
def demo_scores(lm: LM, task: Task, params: Mapping[str, Tensor] | None, recipe: Recipe,
                fmt: Formatter | None = None, embeddings: Tensor | None = None,
                deadline: float | None = None) -> DemoScores | None:
    """The task's demonstrations (`calibration_sample`) scored in the prediction prompt (None for
    tasks without one label set). With demonstrations in the prediction context, each one is
    scored with its own copy masked from attention (leave-one-out at the cost of one prefix: it
    would otherwise copy its label). Where predictions retrieve their demonstrations
    (`Recipe.retrieve`), each is scored in the context it retrieves, itself excluded, and past
    `deadline` (time.monotonic) scoring stops at MIN_CALIBRATION_DEMOS or more."""
    if not task.options:
        return None
    fmt = fmt or Formatter(lm.encode)
    shown = in_context(task, recipe)
    demos = calibration_sample(task, [d for d in task.demonstrations if d.options is None])
    rows = [r for d in demos for r in fmt.candidates(d.input, task.options)]
    if applies(fmt, task, recipe, longest(rows)):
        return _retrieved_scores(lm, task, params, recipe, fmt, demos, embeddings, deadline)
    ids, used = fmt.prefix(shown.instruction, shown.demonstrations, longest(rows))
    spans = demo_spans(fmt, shown.demonstrations, ids, used)
    hide = [spans.get(id(d)) for d in demos for _ in task.options]
    sums, lengths = row_logprobs(lm, encode_prefix(lm, ids, params, used), rows, params, hide=hide)
    shape = (len(demos), len(task.options))
    return DemoScores(demos, list(task.options), sums.view(shape), lengths.view(shape))


def _retrieved_scores(lm: LM, task: Task, params: Mapping[str, Tensor] | None, recipe: Recipe, fmt: Formatter,
                      demos: list[Example], embeddings: Tensor | None, deadline: float | None = None) -> DemoScores:
    """`demo_scores` under retrieval: one prefix per distinct chosen set, as `predict` does; the
    sets in round-robin order over the labels, so that those scored by `deadline` stay balanced."""
    index = {id(d): i for i, d in enumerate(task.demonstrations)}
    if embeddings is None:
        embeddings = embed(lm, [d.input for d in task.demonstrations])
    per: list[list[Row]] = [fmt.candidates(d.input, task.options or []) for d in demos]
    mine = embeddings[[index[id(d)] for d in demos]]
    chosen = contexts(lm, fmt, task, recipe, demos, [longest(r) for r in per], embeddings,
                      exclude=[index[id(d)] for d in demos], query_embeddings=mine)
    shape = (len(demos), len(task.options or []))
    sums, lengths = torch.zeros(shape, device=lm.device), torch.zeros(shape, device=lm.device)
    rank = round_robin(task, demos)
    done: list[int] = []
    for c, members in sorted(grouped(chosen).items(), key=lambda kv: min(rank[i] for i in kv[1])):
        if deadline is not None and len(done) >= MIN_CALIBRATION_DEMOS and time.monotonic() >= deadline:
            break
        sub = chosen_task(task, c)
        rows = [r for i in members for r in per[i]]
        ids, used = fmt.prefix(sub.instruction, sub.demonstrations, longest(rows))
        s, n = row_logprobs(lm, encode_prefix(lm, ids, params, used), rows, params)
        sums[members], lengths[members] = s.view(len(members), -1), n.view(len(members), -1)
        done += members
    keep = sorted(done)
    return DemoScores([demos[i] for i in keep], list(task.options or []), sums[keep], lengths[keep])


def option_prior(lm: LM, task: Task, params: Mapping[str, Tensor] | None, recipe: Recipe,
                 fmt: Formatter | None = None, embeddings: Tensor | None = None,
                 deadline: float | None = None) -> dict[str, float] | None:
    """The options' prior for `predict`, estimated once from the task's own demonstrations
    scored as predictions would score them (`demo_scores`; None for tasks without one label set).
    Stored with the task, it gives every input the same answer whatever else is in its call."""
    scored = demo_scores(lm, task, params, recipe, fmt, embeddings, deadline)
    return scored.prior(recipe.length_norm) if scored else None
