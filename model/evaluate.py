"""Held-out evaluation in MetaICL's protocol (`evaluate`): the base model and meta-trained checkpoints
(`Variant`s), in context and adapted, on a setting's held-out tasks. Its command line is
model/evaluate_cli.py; its numbers come from model/metrics.py, its files from model/report.py."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from model import checkpoints
from model.adapt import adapt
from model.bank.sampling import SEEDS, kshot
from model.lm import LM, Params
from model.meta_train import TaskSource, is_classification
from model.metrics import accuracy, macro_f1, summarise
from model.optim import AdamState
from model.prefix import Prefix, encode_prefix
from model.prompts import Formatter, longest
from model.recipe import LR, Recipe
from model.scoring import predict
from model.task import Example, Task

log = logging.getLogger("mamlserve.evaluate")


def _autocast(lm: LM):
    return torch.autocast("cuda", dtype=torch.bfloat16) if lm.device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def zero_shot_prefix(lm: LM, fmt: Formatter, task: Task, queries: Sequence[Example], params: Params | None) -> Prefix:
    rows = [r for q in queries for r in fmt.candidates(q.input, task.options_for(q) or [q.output])]
    ids, _ = fmt.prefix(task.instruction, [], longest(rows))
    return encode_prefix(lm, ids, params, 0)


def score(lm: LM, task: Task, queries: Sequence[Example], params: Params | None, fmt: Formatter,
          classification: bool, zero_shot: bool = False) -> tuple[float, float | None]:
    """(macro-F1 for classification or accuracy, gold probability), both 0-100, of predictions in
    context of task's demonstrations. The gold probability is the softmax over each query's
    length-normalised option scores, at the gold option, averaged: it moves with every query's
    scores, not only with flipped argmaxes, so it separates models on fewer queries than F1
    (None for generation tasks)."""
    with _autocast(lm):
        prefix = zero_shot_prefix(lm, fmt, task, queries, params) if zero_shot else None
        preds = predict(lm, task, queries, params=params, fmt=fmt, prefix=prefix)
    out, gold = [p.output for p in preds], [q.output for q in queries]
    probs = [torch.tensor(list(p.scores.values()), dtype=torch.float64).softmax(0)[list(p.scores).index(q.output)].item()
             for p, q in zip(preds, queries) if p.scores and q.output in p.scores]
    return (100.0 * (macro_f1(out, gold) if classification else accuracy(out, gold)),
            100.0 * sum(probs) / len(probs) if probs else None)


def fitting(fmt: Formatter, task: Task, queries: Sequence[Example]) -> tuple[Task | None, list[Example]]:
    """Drop demonstrations and queries whose longest row exceeds half the prompt budget (the same
    limit as meta-training): they could not stand beside any demonstration. Returns (None, [])
    when nothing is left to evaluate."""
    limit = fmt.budget // 2

    def ok(e: Example) -> bool:
        opts = task.options_for(e) or [e.output]
        return longest(fmt.candidates(e.input, opts)) <= limit

    demos = [d for d in task.demonstrations if ok(d)]
    kept = [q for q in queries if ok(q)]
    if not demos or not kept:
        return None, []
    return task.model_copy(update={"demonstrations": demos}), kept


class Variant:
    """One row of the comparison: parameters to start from and how to adapt from them."""

    def __init__(self, name: str, space: str, params: Params | None, state: AdamState | None, lr: float):
        self.name, self.space, self.params, self.state, self.lr = name, space, params, state, lr


def checkpoint_variant(lm: LM, data_dir: Path, ckpt_id: str, adapt_lr: float | None,
                       held_out: Sequence[str] = ()) -> Variant:
    """A checkpoint as a row of the comparison; refuses one meta-trained on any of `held_out`."""
    params, state, meta = checkpoints.load(data_dir, ckpt_id, lm.device, lm.dtype)
    checkpoints.check_compatible(meta, lm)
    seen = set(meta.get("meta_train_tasks") or ()) & set(held_out)
    if seen:
        raise checkpoints.CheckpointError(
            f"checkpoint {ckpt_id} was meta-trained on {len(seen)} of these held-out tasks ({', '.join(sorted(seen)[:3])}, ...): "
            "the setting changed since it was trained")
    lr = adapt_lr or checkpoints.inner_lr(meta, meta["space"]) or _default_lr(meta["space"])
    return Variant(ckpt_id, meta["space"], params, state if meta.get("shared_moments") else None, lr)


def _default_lr(space: str) -> float:
    return LR[space]


def evaluate(
    lm: LM,
    source: TaskSource,
    variants: Sequence[Variant],
    k: int = 16,
    seeds: Sequence[int] = SEEDS,
    n_test: int | None = None,
    adapt_steps: int | None = None,
    base_space: str = "lora",
    base_lr: float | None = None,
    fmt: Formatter | None = None,
    max_tasks: int | None = None,
    adapt_batch: int | None = None,
    context_demos: int | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    journal: Path | None = None,
) -> dict[str, Any]:
    """Scores per variant / mode / task / seed, and their summaries.

    For every held-out task of a setting and every seed, k demonstrations are drawn from the task's
    train split (label-balanced; `model.bank.kshot`) and the same test queries are answered by
    option scoring (mean per-token log-likelihood, `model.scoring.predict`):

        base/zero_shot   the base model with no demonstrations
        base/icl         the base model with the k demonstrations in context
        base/adapted     test-time adaptation (`model.adapt.adapt`) from a fresh LoRA, then in context
        <ckpt>/icl       the checkpoint's parameters, k demonstrations in context
        <ckpt>/adapted   `adapt` starting from the checkpoint (and its Adam moments when it was
                         meta-trained with shared moments), then in context

    Score: macro-F1 for classification tasks (one label set), accuracy otherwise, on 0-100. Per
    variant: `mean` = mean over tasks of the mean over seeds; `worst` = mean over tasks of the
    worst seed. The command line writes results.json, results.md and results.png into the output
    folder, and each checkpoint's scores into its meta.json (`evaluation.<setting>`). A checkpoint
    whose meta.json lists any of the evaluated tasks among its meta-train tasks is refused
    (`checkpoint_variant`): the committed settings can be regenerated after a checkpoint was
    trained, and that would leak.

    journal: a JSON-lines file every score is appended to as soon as it is known; an evaluation
    given the journal of an interrupted one (same variants and protocol) reuses its scores, so a
    long evaluation can run as a series of time-limited commands. fmt: the prompt format and
    budget (default: `Formatter`'s, direct in 1024 tokens)."""
    fmt = fmt or Formatter(lm.encode)
    # this protocol (MetaICL-style, meta-training's yardstick) counts adaptation steps of the LM loss
    steps = adapt_steps if adapt_steps is not None else 5
    batch, ctx = adapt_batch or 4, context_demos if context_demos is not None else 4
    tasks = source.held_out[:max_tasks] if max_tasks else source.held_out
    rows = [("base", "zero_shot"), ("base", "icl")] + ([("base", "adapted")] if steps else [])
    for v in variants:
        rows += [(v.name, "icl")] + ([(v.name, "adapted")] if steps else [])
    base = Variant("base", base_space, None, None, base_lr or _default_lr(base_space))
    by_name = {"base": base} | {v.name: v for v in variants}
    raw: dict[str, dict[str, dict[str, list[float]]]] = {f"{n}/{m}": {} for n, m in rows}
    raw_prob: dict[str, dict[str, dict[str, list[float]]]] = {f"{n}/{m}": {} for n, m in rows}
    total, done, t0 = len(tasks) * len(seeds) * len(rows), 0, time.perf_counter()
    protocol = {"setting": source.setting, "tasks": [t.name for t in tasks], "rows": [f"{n}/{m}" for n, m in rows],
                "k": k, "seeds": list(seeds), "n_test": n_test, "adapt_steps": steps, "adapt_batch": batch,
                "context_demos": ctx, "budget": fmt.budget, "lrs": {v.name: v.lr for v in by_name.values()},
                "model": lm.sha256}
    known = _open_journal(journal, protocol) if journal else {}
    for task in tasks:
        cls = is_classification(task)
        for seed in seeds:
            ktask, queries = fitting(fmt, *kshot(task, k, seed, n_test=n_test))
            if ktask is None:
                log.warning("%s seed %d: no demonstration or query fits %d tokens; skipped", task.name, seed, fmt.budget)
                done += len(rows)
                continue
            for name, mode in rows:
                v = by_name[name]
                key = f"{name}/{mode}|{task.name}|{seed}"
                if key in known:
                    val, prob = known[key]
                elif mode == "zero_shot":
                    val, prob = score(lm, ktask, queries, v.params, fmt, cls, zero_shot=True)
                elif mode == "icl":
                    val, prob = score(lm, ktask, queries, v.params, fmt, cls)
                else:
                    # this protocol counts steps, not epochs: pin them
                    recipe = Recipe(loss="lm", epochs=1, batch_size=batch, lr=v.lr, context_demos=ctx, predict_demos=None,
                                    calibrate=False, min_demos=0, min_steps=steps, max_steps=steps)
                    with _autocast(lm):
                        a = adapt(lm, ktask, recipe, v.space, start=v.params,
                                  state=v.state.detached() if v.state else None, seed=seed, fmt=fmt)
                    adapted = {**(v.params or {}), **a.params}
                    val, prob = score(lm, ktask, queries, adapted, fmt, cls)
                if journal and key not in known:
                    with open(journal, "a") as f:
                        f.write(json.dumps({"key": key, "score": val, "gold_prob": prob}) + "\n")
                raw[f"{name}/{mode}"].setdefault(task.name, []).append(val)
                if prob is not None:
                    raw_prob[f"{name}/{mode}"].setdefault(task.name, []).append(prob)
                done += 1
                if progress:
                    progress(done, total, f"{task.name} seed {seed} {name}/{mode}: {val:.1f}")
        log.info("%s: %s", task.name, ", ".join(f"{r} {sum(x[task.name]) / len(x[task.name]):.1f}" for r, x in raw.items()))
    return {
        "setting": source.setting, "k": k, "seeds": list(seeds), "n_test": n_test, "adapt_steps": steps,
        "adapt_lrs": protocol["lrs"],
        "tasks": [t.name for t in tasks], "model": {"name": lm.name, "sha256": lm.sha256},
        "seconds": time.perf_counter() - t0,
        "results": {r: summarise(x) | {"gold_prob": summarise(raw_prob[r])} for r, x in raw.items()},
    }


def _open_journal(path: Path, protocol: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """The scores an earlier run of the same protocol journaled; a new journal starts with the protocol."""
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    if not text.endswith("\n"):  # a killed run's last line is cut short: drop it before appending
        text = text[: text.rfind("\n") + 1]
    lines = text.splitlines()
    if not lines:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"protocol": protocol}) + "\n")
        return {}
    path.write_text(text)
    head = json.loads(lines[0]).get("protocol")
    if head != json.loads(json.dumps(protocol)):
        raise ValueError(f"journal {path} belongs to another evaluation (its protocol differs); use a new one")
    known = {}
    for line in lines[1:]:
        e = json.loads(line)
        known[e["key"]] = (e["score"], e["gold_prob"])
    log.info("journal %s: %d scores reused", path, len(known))
    return known


if __name__ == "__main__":  # the command line lives in model/evaluate_cli.py
    import typer

    from model.evaluate_cli import main

    typer.run(main)
