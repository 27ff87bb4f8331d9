"""Held-out evaluation in MetaICL's protocol: base model vs meta-trained checkpoints, in context and adapted.

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
worst seed. Writes results.json, results.md and results.png into the output folder, and each
checkpoint's scores into its meta.json (`evaluation.<setting>`). A checkpoint whose meta.json
lists any of the evaluated tasks among its meta-train tasks is refused: the committed settings
can be regenerated after a checkpoint was trained, and that would leak.
"""

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
from model.adapt import AdamState, adapt
from model.bank.sampling import SEEDS, kshot
from model.lm import LM, Params
from model.meta_train import TaskSource, is_classification, task_source
from model.metrics import accuracy, macro_f1
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
    """Scores per variant / mode / task / seed, and their summaries (see the module docstring).

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


# --------------------------------------------------------------------------- reports
def markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    names = list(dict.fromkeys(r.split("/")[0] for r in res))
    lines = [f"# Held-out evaluation: {report['setting']}", "",
             f"{len(report['tasks'])} tasks, k={report['k']}, seeds {report['seeds']}, "
             f"{report['adapt_steps']} adaptation steps, model {report['model']['name']}. "
             "Macro-F1 (classification) or accuracy, 0-100; mean over tasks of the mean / worst seed.", "",
             "| variant | 0-shot | in context (mean) | in context (worst) | adapted (mean) | adapted (worst) "
             "| gold p, in context | gold p, adapted |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(key: str, what: str) -> str:
        r = res.get(key, {})
        val = r.get("gold_prob", {}).get("mean") if what == "gold_prob" else r.get(what)
        return "-" if val is None else f"{val:.1f}"

    for n in names:
        lines.append(f"| {n} | {cell(n + '/zero_shot', 'mean')} | {cell(n + '/icl', 'mean')} | {cell(n + '/icl', 'worst')} "
                     f"| {cell(n + '/adapted', 'mean')} | {cell(n + '/adapted', 'worst')} "
                     f"| {cell(n + '/icl', 'gold_prob')} | {cell(n + '/adapted', 'gold_prob')} |")
    if report.get("comparisons"):
        lines += ["", "Paired differences (row a minus row b, by task and seed; 95% bootstrap interval over tasks):", "",
                  "| a | b | metric | difference | 95% interval | separated |", "|---|---|---|---|---|---|"]
        for c in report["comparisons"]:
            ci = "-" if c["ci95"] is None else f"[{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"
            diff = "-" if c["diff"] is None else f"{c['diff']:+.1f}"
            lines.append(f"| {c['a']} | {c['b']} | {c['metric']} | {diff} | {ci} | {'yes' if c['separated'] else 'no'} |")
    lines += ["", "Per task (mean over seeds):", "", "| task | " + " | ".join(res) + " |", "|---|" + "---|" * len(res)]
    for t in report["tasks"]:
        lines.append(f"| {t} | " + " | ".join(f"{res[r]['per_task'].get(t, float('nan')):.1f}" for r in res) + " |")
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    keys = list(res)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys) + 2), 4.5))
    colors = {"zero_shot": "#999999", "icl": "#4C72B0", "adapted": "#DD8452"}
    xs = range(len(keys))
    nan = float("nan")  # a row with no scored task (every task skipped) draws nothing
    ax.bar(xs, [nan if res[k]["mean"] is None else res[k]["mean"] for k in keys],
           color=[colors.get(k.split("/")[-1], "#55A868") for k in keys])
    ax.scatter(xs, [nan if res[k]["worst"] is None else res[k]["worst"] for k in keys], color="black", marker="_", s=300, zorder=3, label="worst seed")
    ax.set_xticks(list(xs), [_short(k) for k in keys], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("macro-F1 / accuracy (0-100)")
    ax.set_title(f"held-out tasks of {report['setting']} (k={report['k']}, {len(report['seeds'])} seeds)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _short(key: str) -> str:
    """'v0003-maml-lora-class_to_class/icl' -> 'v0003-maml-lora icl' (the setting is in the title)."""
    name, mode = key.rsplit("/", 1)
    return f"{'-'.join(name.split('-')[:3])} {mode}"


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "chart": out / "results.png"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["markdown"].write_text(markdown(report))
    chart(report, paths["chart"])
    return paths


def record(report: dict[str, Any], data_dir: Path, ckpt_ids: Sequence[str]) -> None:
    """Write each checkpoint's summary into its meta.json."""
    for c in ckpt_ids:
        summary = {m: report["results"][f"{c}/{m}"]["mean"] for m in ("icl", "adapted") if f"{c}/{m}" in report["results"]}
        summary |= {f"{m}_worst": report["results"][f"{c}/{m}"]["worst"] for m in ("icl", "adapted") if f"{c}/{m}" in report["results"]}
        summary |= {"k": report["k"], "seeds": report["seeds"], "tasks": len(report["tasks"]),
                    "adapt_steps": report["adapt_steps"], "adapt_lr": report.get("adapt_lrs", {}).get(c),
                    "base_icl": report["results"]["base/icl"]["mean"]}
        checkpoints.update_meta(data_dir, c, evaluation={report["setting"]: summary})


def shortest_tasks(lm: LM, tasks: list, n: int | None) -> list:
    """The n tasks with the shortest rows (median tokens of input + longest option over the first
    32 test examples): a short prompt budget would drop most queries of the others."""
    def size(t) -> float:
        rows = sorted(len(lm.encode(e.input)) + max(len(lm.encode(o)) for o in (t.options or e.options or [e.output]))
                      for e in t.test[:32])
        return rows[len(rows) // 2] if rows else float("inf")

    ranked = sorted(tasks, key=lambda t: (size(t), t.name))
    return ranked[:n] if n else ranked


# --------------------------------------------------------------------------- CLI
def load_for_eval(spec: str, data_dir: Path, device: str = "auto") -> LM:
    from model.loading import load_lm

    lm = load_lm(spec, data_dir, device, attn="sdpa")
    if lm.device.type == "cuda":
        lm.model.float()  # fp32 weights + bf16 autocast, as in meta-training
    return lm


def main(
    setting: str = "class_to_class",
    checkpoint: list[str] = [],  # noqa: B006 (typer reads the default)
    model: str | None = None,
    k: int = 16,
    seeds: str = ",".join(map(str, SEEDS)),
    n_test: int | None = None,
    max_tasks: int | None = None,
    adapt_steps: int | None = None,
    adapt_lr: float | None = None,
    adapt_batch: int | None = None,
    context_demos: int | None = None,
    shortest: bool = False,
    settings_dir: Path | None = None,
    context_tokens: int | None = None,
    out: Path | None = None,
    journal: Path | None = None,
    device: str | None = None,
    data_dir: Path | None = None,
) -> None:
    """Evaluate the base model and checkpoints on a setting's held-out tasks; print where the report went.

    adapt_lr: test-time lr for every variant (default: each checkpoint's meta-training inner lr,
    the settings' adapt lr for the base). --shortest: take the max_tasks held-out tasks with the
    shortest examples rather than the first ones (for short prompt budgets). journal: a file scores
    are appended to as they come; the same command with the same journal resumes where it stopped."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from model.settings import get_settings

    s = get_settings()  # the CLI's defaults come from the environment (MAMLSERVE_*), as the service's do
    ddir = data_dir or s.data_dir
    lm = load_for_eval(model or s.base_model, ddir, device or s.device)
    source = task_source(setting, ddir, settings_dir)
    if shortest:
        source.held_out = shortest_tasks(lm, source.held_out, max_tasks)
    names = [t.name for t in source.held_out]
    variants = [checkpoint_variant(lm, ddir, c, adapt_lr, names) for c in checkpoint]
    fmt = Formatter(lm.encode, s.prompt_format, context_tokens or s.context_tokens)
    report = evaluate(lm, source, variants, k, [int(x) for x in seeds.split(",")], n_test, adapt_steps,
                      base_lr=adapt_lr, fmt=fmt, max_tasks=max_tasks, adapt_batch=adapt_batch,
                      context_demos=context_demos, journal=journal)
    out = out or ddir / "eval" / f"{setting}-{time.strftime('%Y%m%d-%H%M%S')}"
    paths = write_report(report, out)
    record(report, ddir, checkpoint)
    print(markdown(report))
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    import typer

    typer.run(main)
