"""Numbers from predictions: accuracy and macro-F1 (MetaICL: macro-F1 for classification, accuracy
otherwise)."""

from __future__ import annotations

from collections.abc import Sequence


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

