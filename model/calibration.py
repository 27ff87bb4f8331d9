"""Batch calibration: the options' prior (`prior_of`, `option_prior`) from the task's demonstrations
scored as predictions score them, each leave-one-out (`demo_scores`, `DemoScores`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import math

import torch
from torch import Tensor

from model.lm import LM
from model.prefix import encode_prefix, in_context, row_logprobs
from model.prompts import Formatter, longest
from model.recipe import Recipe
from model.task import Example, Task


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
                fmt: Formatter | None = None) -> DemoScores | None:
    """The task's demonstrations scored in the prediction prompt (None for tasks without one
    label set). With demonstrations in the prediction context, each one is scored with its own
    copy masked from attention (leave-one-out at the cost of one prefix: it would otherwise
    copy its label)."""
    if not task.options:
        return None
    fmt = fmt or Formatter(lm.encode)
    shown = in_context(task, recipe)
    demos = [d for d in task.demonstrations if d.options is None]
    rows = [r for d in demos for r in fmt.candidates(d.input, task.options)]
    ids, used = fmt.prefix(shown.instruction, shown.demonstrations, longest(rows))
    spans = demo_spans(fmt, shown.demonstrations, ids, used)
    hide = [spans.get(id(d)) for d in demos for _ in task.options]
    sums, lengths = row_logprobs(lm, encode_prefix(lm, ids, params, used), rows, params, hide=hide)
    shape = (len(demos), len(task.options))
    return DemoScores(demos, list(task.options), sums.view(shape), lengths.view(shape))


def option_prior(lm: LM, task: Task, params: Mapping[str, Tensor] | None, recipe: Recipe,
                 fmt: Formatter | None = None) -> dict[str, float] | None:
    """The options' prior for `predict`, estimated once from the task's own demonstrations
    scored as predictions would score them (`demo_scores`; None for tasks without one label set).
    Stored with the task, it gives every input the same answer whatever else is in its call."""
    scored = demo_scores(lm, task, params, recipe, fmt)
    return scored.prior(recipe.length_norm) if scored else None
