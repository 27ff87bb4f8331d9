"""Numbers from predictions: accuracy and macro-F1 (MetaICL: macro-F1 for classification, accuracy
otherwise), their summary over tasks and seeds, and the paired bootstrap between two rows of a report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    return sum(p == g for p, g in zip(preds, golds)) / max(len(golds), 1)


def macro_f1(preds: Sequence[str], golds: Sequence[str]) -> float:
    labels = sorted(set(golds) | set(preds))
    f1s = []
    for c in labels:
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / max(len(f1s), 1)


def summarise(per_task: dict[str, list[float]]) -> dict[str, Any]:
    means = {t: sum(v) / len(v) for t, v in per_task.items()}
    worst = {t: min(v) for t, v in per_task.items()}
    n = len(per_task)
    return {"mean": sum(means.values()) / n if n else None, "worst": sum(worst.values()) / n if n else None,
            "per_task": means, "per_task_worst": worst, "per_seed": per_task}


MIN_TASKS = 5


def paired(report: dict[str, Any], a: str, b: str, metric: str | None = None, n_boot: int = 10_000,
           seed: int = 0) -> dict[str, Any]:
    """Row a minus row b (e.g. "v0001-…/icl" vs "v0003-…/icl"), paired by task and seed: the mean
    difference over tasks and a 95% bootstrap interval that resamples tasks (the unit the result
    should generalise over). `separated` is true when the interval excludes 0 over at least
    MIN_TASKS tasks (with fewer, resampling cannot tell). metric None: the score (F1 / accuracy);
    "gold_prob": the gold probability."""
    ra, rb = report["results"][a], report["results"][b]
    if metric:
        ra, rb = ra[metric], rb[metric]
    common = [t for t in ra["per_seed"] if t in rb["per_seed"] and len(ra["per_seed"][t]) == len(rb["per_seed"][t])]
    if not common:
        return {"diff": None, "ci95": None, "tasks": 0, "separated": False}
    d = torch.tensor([sum(x - y for x, y in zip(ra["per_seed"][t], rb["per_seed"][t])) / len(ra["per_seed"][t])
                      for t in common], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    boot = d[torch.randint(len(d), (n_boot, len(d)), generator=g)].mean(1)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": d.mean().item(), "ci95": [lo, hi], "tasks": len(common), "separated": len(d) >= MIN_TASKS and (lo > 0 or hi < 0)}
