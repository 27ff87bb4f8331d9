"""k-shot sampling (MetaICL's evaluation protocol) and support/query episodes (meta-training).

Demonstrations come from the train split; test queries from test (or dev). With a fixed label
set the k demonstrations are balanced across labels as far as the train split allows, so a
16-shot binary task shows 8 of each; otherwise they are drawn uniformly. Every draw is seeded
by (task name, seed), so results do not depend on the order tasks are visited.
"""

from __future__ import annotations

import random
from collections import defaultdict

from model.bank.catalog import BankTask
from model.task import Example, Task

K = 16
SEEDS = (100, 13, 21, 42, 87)  # MetaICL's five seeds


def _rng(task: BankTask, seed: int | str) -> random.Random:
    return random.Random(f"{task.name}:{seed}")


def balanced(pool: list[Example], k: int, labels: list[str] | None, rng: random.Random) -> list[Example]:
    """k examples from pool (all of them if fewer), spread evenly over labels when there are labels."""
    if k >= len(pool):
        out = list(pool)
        rng.shuffle(out)
        return out
    if not labels:
        return rng.sample(pool, k)
    by: dict[str, list[Example]] = defaultdict(list)
    for e in pool:
        by[e.output].append(e)
    for v in by.values():
        rng.shuffle(v)
    order = [lab for lab in labels if by[lab]]
    rng.shuffle(order)  # which labels get the remainder of k / n_labels is random too
    out: list[Example] = []
    while len(out) < k:  # round-robin: one per label per round until k (labels run dry -> others fill)
        for lab in order:
            if by[lab] and len(out) < k:
                out.append(by[lab].pop())
    rng.shuffle(out)
    return out


def make_task(task: BankTask, demos: list[Example]) -> Task:
    return Task(demonstrations=demos, instruction=task.instruction, options=task.options)


def kshot(task: BankTask, k: int = K, seed: int = SEEDS[0], split: str = "test",
          n_test: int | None = None) -> tuple[Task, list[Example]]:
    """(Task with k train demonstrations drawn with `seed`, gold test Examples).

    The test examples do not depend on `seed` (MetaICL varies only the demonstrations); n_test
    keeps a fixed random subset of them.
    """
    demos = balanced(task.train, k, task.options, _rng(task, seed))
    queries = list(task.split(split))
    if n_test is not None and n_test < len(queries):
        queries = _rng(task, "test").sample(queries, n_test)
    return make_task(task, demos), queries


def kshot_runs(task: BankTask, k: int = K, seeds: tuple[int, ...] = SEEDS, split: str = "test",
               n_test: int | None = None) -> list[tuple[int, Task, list[Example]]]:
    """MetaICL's protocol: one k-shot Task per seed, all evaluated on the same queries."""
    return [(s, *kshot(task, k, s, split, n_test)) for s in seeds]


def sample_episode(task: BankTask, k_support: int, k_query: int, rng: random.Random) -> tuple[Task, list[Example]]:
    """One meta-training episode from the task's train split: disjoint support (a Task) and query set.

    Support is label-balanced like kshot; queries are drawn uniformly from what is left. When
    the train split is small, the query set shrinks first (the support keeps k_support, capped
    so that at least one query remains).
    """
    pool = task.train
    if len(pool) < 2:
        raise ValueError(f"task {task.name} has {len(pool)} train examples; an episode needs 2")
    support = balanced(pool, min(k_support, len(pool) - 1), task.options, rng)
    taken = {id(e) for e in support}
    rest = [e for e in pool if id(e) not in taken]
    query = rng.sample(rest, min(k_query, len(rest)))
    return make_task(task, support), query
