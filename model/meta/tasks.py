"""Where meta-training's tasks come from: a setting's meta-train and held-out tasks, from the task
bank or built in code (the synthetic family the tests and benchmarks run on)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.blobs import Blobs
from model.task import Example


@dataclass
class SynthTask:
    """A task shaped like a bank task (name, options, instruction, train, test)."""

    name: str
    options: list[str]
    train: list[Example]
    test: list[Example]
    instruction: str | None = None
    kind: str = "classification"

    @property
    def is_classification(self) -> bool:
        return True

    def split(self, name: str) -> list[Example]:
        return {"train": self.train, "test": self.test, "dev": []}[name]


@dataclass
class TaskSource:
    setting: str
    meta_train: list[Any]  # bank tasks or SynthTask: .name .options .instruction .train .test
    held_out: list[Any]


_WORDS = ("movie great loved terrible boring quick brown fox jumps lazy dog paris berlin london tokyo "
          "madrid rome question answer input output film capital france true false yes no").split()
_LABELS = ("yes no true false positive negative sports politics business science world neutral "
           "entailment contradiction").split()


def synthetic_task(i: int, seed: int = 0, n_train: int = 64, n_test: int = 32) -> SynthTask:
    """A small classification task: two words in, a label out, the label a random function of the
    first word. Label names and the mapping differ per task, so a model gains on held-out
    tasks only by learning to read the mapping off the demonstrations (or to adapt fast)."""
    rng = random.Random(f"synthetic:{seed}:{i}")
    options = rng.sample(_LABELS, rng.choice((2, 3)))
    keys = rng.sample(_WORDS, 8)
    mapping = {w: options[j % len(options)] for j, w in enumerate(keys)}

    def example() -> Example:
        w = rng.choice(keys)
        return Example.model_construct(input=f"{w} {rng.choice(_WORDS)}", output=mapping[w], options=None)

    return SynthTask(f"synthetic-{seed}-{i}", options, [example() for _ in range(n_train)], [example() for _ in range(n_test)])


def synthetic_source(n_train: int = 24, n_held_out: int = 6, seed: int = 0) -> TaskSource:
    tasks = [synthetic_task(i, seed) for i in range(n_train + n_held_out)]
    return TaskSource("synthetic", tasks[:n_train], tasks[n_train:])


def task_source(setting: str, data_dir: Path | Blobs | None = None, settings_dir: Path | None = None) -> TaskSource:
    """The meta-train and held-out tasks of a setting: 'synthetic', or one of the task bank's
    (the bank under data_dir/bank, or under bank/ in a store)."""
    if setting == "synthetic":
        return synthetic_source()
    from model.bank.catalog import SETTINGS_DIR, load_bank

    bank = load_bank(data_dir, settings_dir or SETTINGS_DIR)
    s = bank.setting(setting)
    return TaskSource(setting, bank.tasks(list(s.meta_train)), bank.tasks(list(s.held_out)))


def is_classification(task: Any) -> bool:
    meta = getattr(task, "meta", None)
    if meta is not None and hasattr(meta, "is_classification"):
        return bool(meta.is_classification)
    return getattr(task, "options", None) is not None
