"""Shared test helpers for the model library (tiny model, small tasks)."""

from pathlib import Path

import torch

from model.loading import load_lm
from model.task import Task

# The tiny model's ops are microseconds long: with 2 threads on a loaded 2-core machine,
# OpenMP's spin-waits make them ~50x slower than with one.
torch.set_num_threads(1)

SENTIMENT = [
    ("the movie was great", "positive"), ("i loved the film", "positive"), ("a wonderful story", "positive"),
    ("great acting and a fine plot", "positive"), ("the best film this year", "positive"),
    ("the movie was terrible", "negative"), ("a boring and dull film", "negative"), ("i hated it", "negative"),
    ("the worst plot ever", "negative"), ("bad acting and a weak story", "negative"),
]


def tiny_lm(tmp: Path | None = None, **kw):
    return load_lm("tiny", tmp or Path("/nonexistent-unused"), **kw)


def sentiment_task(n: int = 10, **kw) -> Task:
    demos = [{"input": x, "output": y} for x, y in SENTIMENT[:n]]
    return Task(demonstrations=demos, options=["positive", "negative"], **kw)
