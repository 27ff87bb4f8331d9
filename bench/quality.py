"""The whole comparison in one run: MAML-en-LLM vs FOMAML vs Reptile vs MetaICL vs no meta-training,
in context and after test-time adaptation, on one setting's held-out tasks at a fixed budget.

Every method gets the same budget: the same outer steps, tasks per step, episode sizes and
(per step) the same sampled tasks and examples (the draws depend on seed and step only).
Then `model.evaluate` scores the base model and the four checkpoints on the held-out tasks
(MetaICL protocol, macro-F1 / accuracy on 0-100, and the gold option's probability), and the
pairs that matter (maml vs metaicl, maml vs fomaml, reptile vs fomaml, each vs base) are compared paired by task
and seed, with a 95% bootstrap interval over tasks: a margin whose interval spans 0 is noise
at this budget. The last line printed is JSON: {"setting", "budget", "results":
{maml|fomaml|reptile|metaicl|base: {"icl", "adapted", ...}}, "margins", ...}.

Meta-training runs with inner_context "sampled" (`context_demos` drawn demonstrations per
example): the context `model.evaluate` adapts in (its recipe has `context_demos` set), and the
one the committed results were measured with.

A run can be interrupted anywhere and resumed by running it again with the same --out:
meta-training checkpoints every tenth of its steps and resumes from the furthest one, and every
evaluation score is journaled as soon as it is known. That is how the gpu budget fits the device
tool's 10-minute commands: `timeout 540 python bench/quality.py --budget gpu --out DIR`, again
until it prints its JSON line.

Budgets:
  cpu   SmolLM2, LoRA space, short sequences and few shots: ≤ 60 min on 2 cores
  gpu   SmolLM2 on a CUDA device, LoRA space, MetaICL's k=16, longer meta-training. Measured on an
        H100: a maml step of this budget takes 4.5 s (latency-bound: ~1 s per task for a 135M
        model), so 200 steps are ~15 min of maml; plan ~40 min for the whole run
  tiny  the tiny random model on the synthetic family: a smoke run of the whole pipeline

    python bench/quality.py --budget cpu --setting class_to_class
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import checkpoints  # noqa: E402
from model.evaluate import checkpoint_variant, evaluate  # noqa: E402
from model.evaluate_cli import shortest_tasks  # noqa: E402
from model.loading import load_for_autocast  # noqa: E402
from model.meta_train import MetaTrainConfig, meta_train, task_source  # noqa: E402
from model.metrics import paired  # noqa: E402
from model.prompts import Formatter  # noqa: E402
from model.report import markdown, record, write_report  # noqa: E402
from model.settings import get_settings  # noqa: E402

BUDGETS = {
    "cpu": dict(
        model="smollm2", space="lora", steps=40, tasks_per_step=2, inner_steps=1, support_size=4, support_batch=2,
        query_size=2, context_demos=2, context_tokens=192, inner_lr=1e-3, outer_lr=3e-4,
        eval=dict(k=4, seeds=[100, 13], n_test=12, max_tasks=8, adapt_steps=2, adapt_batch=2, context_demos=2),
    ),
    "gpu": dict(
        model="smollm2", space="lora", steps=200, tasks_per_step=4, inner_steps=2, support_size=8, support_batch=4,
        query_size=4, context_demos=4, context_tokens=512, inner_lr=1e-3, outer_lr=3e-4,
        eval=dict(k=16, seeds=[100, 13, 21], n_test=32, max_tasks=12, adapt_steps=5, adapt_batch=4, context_demos=4),
    ),
    "tiny": dict(
        model="tiny", space="lora", steps=6, tasks_per_step=2, inner_steps=1, support_size=4, support_batch=2,
        query_size=2, context_demos=2, context_tokens=128, inner_lr=1e-2, outer_lr=1e-2,
        eval=dict(k=4, seeds=[100, 13], n_test=8, max_tasks=2, adapt_steps=1, adapt_batch=2, context_demos=2),
    ),
}
METHODS = ("maml", "fomaml", "reptile", "metaicl")
PAIRS = (("maml", "metaicl"), ("maml", "fomaml"), ("reptile", "fomaml"), ("maml", "base"), ("metaicl", "base"))
log = logging.getLogger("bench.quality")


def latest(data_dir: Path, tag: str, method: str) -> dict | None:
    """The furthest-trained checkpoint of this run's method (the newest among equals), if any."""
    mine = [m for m in checkpoints.list_checkpoints(data_dir)
            if m.get("config", {}).get("tag") == tag and m["method"] == method]
    return max(reversed(mine), key=lambda m: m["step"]) if mine else None


def comparisons(report: dict, ids: dict[str, str]) -> list[dict]:
    """Paired differences of the pairs the issue asks about, in both modes and on both metrics."""
    names = ids | {"base": "base"}
    out = []
    for a, b in PAIRS:
        for mode in ("icl", "adapted"):
            ra, rb = f"{names[a]}/{mode}", f"{names[b]}/{mode}"
            if ra not in report["results"] or rb not in report["results"]:
                continue
            for metric in (None, "gold_prob"):
                c = paired(report, ra, rb, metric)
                out.append({"a": f"{a}/{mode}", "b": f"{b}/{mode}", "metric": metric or "score", **c})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", choices=list(BUDGETS), default="cpu")
    ap.add_argument("--setting", default=None, help="task-bank setting (tiny budget: 'synthetic')")
    ap.add_argument("--model", default=None, help="override the budget's model spec (e.g. a .gguf path)")
    ap.add_argument("--seeds", default=None, help="override the budget's evaluation seeds, comma-separated")
    ap.add_argument("--steps", type=int, default=None, help="override the budget's outer steps")
    ap.add_argument("--max-tasks", type=int, default=None, help="override the budget's held-out task count")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-tasks", action="store_true", help="meta-train with a step's tasks vmapped (for GPUs)")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None,
                    help="report folder; run again with the same --out to resume an interrupted run")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 by default: on a busy 2-core machine two threads' spin-waits made a "
                         "SmolLM2 meta step 15x slower (90 s vs 6 s), on a quiet one 2 are ~1.7x faster")
    ap.add_argument("--settings-dir", type=Path, default=None, help="task-bank settings folder (default: the committed one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    budget = {k: v for k, v in BUDGETS[args.budget].items()}
    ev = dict(budget.pop("eval"))
    if args.steps is not None:
        budget["steps"] = args.steps
    if args.model:
        budget["model"] = args.model
    if args.seeds:
        ev["seeds"] = [int(x) for x in args.seeds.split(",")]
    if args.max_tasks is not None:
        ev["max_tasks"] = args.max_tasks
    setting = args.setting or ("synthetic" if args.budget == "tiny" else "class_to_class")
    data_dir = args.data_dir or get_settings().data_dir
    out = (args.out or data_dir / "bench" / f"quality-{args.budget}-{setting}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    tag = f"bench/quality {args.budget} {out}"  # finds this run's checkpoints when it is resumed
    log.info("report folder %s (pass it as --out to resume this run)", out)
    t0 = time.perf_counter()

    lm = load_for_autocast(budget["model"], data_dir, args.device or get_settings().device)  # fp32 (+ bf16 autocast on CUDA)
    source = task_source(setting, data_dir, args.settings_dir)
    source.held_out = shortest_tasks(lm, source.held_out, ev["max_tasks"])  # the budget's sequences are short
    train_cfg = {k: v for k, v in budget.items() if k != "model"} | {"batch_tasks": args.batch_tasks,
                                                                      "inner_context": "sampled"}
    ids, train_s = {}, {}
    for method in METHODS:
        prev = latest(data_dir, tag, method)
        if prev and prev["status"] == "done" and prev["step"] >= budget["steps"]:
            ids[method] = prev["id"]
            log.info("%s: %s already trained", method, prev["id"])
        else:
            cfg = MetaTrainConfig(method=method, setting=setting, base_model=budget["model"], data_dir=data_dir,
                                  tag=tag, log_every=10, save_every=max(1, budget["steps"] // 10),
                                  resume=prev["id"] if prev else None, **train_cfg)
            ids[method] = meta_train(cfg, lm=lm, source=source)
        history = checkpoints.read_meta(data_dir, ids[method]).get("history", [])
        train_s[method] = sum(h.get("seconds") or 0 for h in history)  # over the resumed runs too
        logging.info("%s: %s, %.0f s of meta-training", method, ids[method], train_s[method])

    variants = [checkpoint_variant(lm, data_dir, ids[m], budget["inner_lr"], [t.name for t in source.held_out])
                for m in METHODS]
    fmt = Formatter(lm.encode, get_settings().prompt_format, budget["context_tokens"])
    report = evaluate(lm, source, variants, ev["k"], ev["seeds"], ev["n_test"], ev["adapt_steps"],
                      base_space=budget["space"], base_lr=budget["inner_lr"], fmt=fmt, max_tasks=ev["max_tasks"],
                      adapt_batch=ev["adapt_batch"], context_demos=ev["context_demos"],
                      journal=out / f"journal-{'-'.join(ids[m].split('-')[0] for m in METHODS)}.jsonl")
    report["budget"] = {"name": args.budget, **budget, "eval": ev}
    report["checkpoints"] = ids
    report["comparisons"] = comparisons(report, ids)
    paths = write_report(report, out)
    record(report, data_dir, list(ids.values()))
    print(markdown(report))

    res = report["results"]

    def pair(name: str) -> dict[str, float | None]:
        row = {}
        for mode in ("icl", "adapted"):
            r = res[f"{name}/{mode}"]
            row |= {mode: _round(r["mean"]), f"{mode}_worst": _round(r["worst"]), f"{mode}_gold_prob": _round(r["gold_prob"]["mean"])}
        return row

    results = {m: pair(ids[m]) for m in METHODS} | {"base": pair("base") | {"zero_shot": _round(res["base/zero_shot"]["mean"])}}
    margins = {f"{c['a']}-{c['b']}" + ("" if c["metric"] == "score" else f" ({c['metric']})"):
               {"diff": _round(c["diff"]), "ci95": [_round(x) for x in c["ci95"] or []], "separated": c["separated"]}
               for c in report["comparisons"]}
    print(json.dumps({
        "setting": setting, "budget": report["budget"], "results": results, "margins": margins, "tasks": report["tasks"],
        "train_seconds": {m: round(s) for m, s in train_s.items()}, "eval_seconds": round(report["seconds"]),
        "total_seconds": round(time.perf_counter() - t0), "device": str(lm.device), "threads": torch.get_num_threads(),
        "report": str(paths["markdown"]),
    }))


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


if __name__ == "__main__":
    main()
