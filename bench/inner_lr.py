"""Does the inner loop help? Held-out query loss before and after n inner steps, per inner lr,
from the base model's fresh LoRA and from meta-trained checkpoints, side by side in one run.

The inner loop is `model.adapt.inner_loop` at order 0 (test time), on the same support and
query episodes for every lr and start (`MetaTrainer.held_out_loss`, episodes fixed by seed).
A checkpoint meta-trained with shared moments adapts from its Adam state, as the evaluation
and the service do. `gain` = loss in context - loss after adaptation: negative means the inner
steps hurt. The last line printed is JSON: {"starts": {start: {lr: {"icl", "adapted", "gain"}}}}.

    python bench/inner_lr.py --setting class_to_class --checkpoint v0004-maml-lora-class_to_class
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
from model.evaluate_cli import shortest_tasks  # noqa: E402
from model.loading import load_for_autocast  # noqa: E402
from model.meta_train import MetaTrainConfig, MetaTrainer, task_source  # noqa: E402
from model.optim import AdamState  # noqa: E402
from model.settings import get_settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", default="class_to_class")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--checkpoint", action="append", default=[], help="a checkpoint id to start from (repeatable)")
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3")
    ap.add_argument("--steps", type=int, default=2, help="inner steps")
    ap.add_argument("--tasks", type=int, default=6, help="held-out tasks (the shortest, as bench/quality.py takes)")
    ap.add_argument("--support-size", type=int, default=4)
    ap.add_argument("--support-batch", type=int, default=2)
    ap.add_argument("--query-size", type=int, default=8)
    ap.add_argument("--context-demos", type=int, default=2)
    ap.add_argument("--inner-context", choices=["sampled", "recipe"], default="sampled",
                    help="sampled: --context-demos drawn demonstrations per example; recipe: the prediction prompt")
    ap.add_argument("--context-tokens", type=int, default=192)
    ap.add_argument("--device", default=None)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    data_dir = args.data_dir or get_settings().data_dir
    t0 = time.perf_counter()

    lm = load_for_autocast(args.model, data_dir, args.device or get_settings().device)
    source = task_source(args.setting, data_dir)
    source.held_out = shortest_tasks(lm, source.held_out, args.tasks)
    starts: dict[str, tuple[dict, AdamState | None]] = {"base": ({}, None)}
    for c in args.checkpoint:
        params, state, meta = checkpoints.load(data_dir, c, lm.device)
        checkpoints.check_compatible(meta, lm)
        seen = set(meta.get("meta_train_tasks") or ()) & {t.name for t in source.held_out}
        if seen:
            raise SystemExit(f"{c} was meta-trained on held-out tasks {sorted(seen)[:3]}")
        starts[c] = ({k: v.float() for k, v in params.items()}, state if meta.get("shared_moments") else None)

    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, (params, state) in starts.items():
        out[name] = {}
        for lr in [float(x) for x in args.lrs.split(",")]:
            cfg = MetaTrainConfig(method="fomaml", space="lora", setting=args.setting, inner_lr=lr,
                                  shared_moments=state is not None, support_size=args.support_size,
                                  support_batch=args.support_batch, query_size=args.query_size,
                                  context_demos=args.context_demos, context_tokens=args.context_tokens,
                                  inner_context=args.inner_context)
            trainer = MetaTrainer(cfg, lm, source, dict(params), state.detached() if state else AdamState())
            r = trainer.held_out_loss(n_tasks=args.tasks, adapt_steps=args.steps)
            out[name][f"{lr:g}"] = {"icl": round(r["icl"], 4), "adapted": round(r["adapted"], 4),
                                    "gain": round(r["icl"] - r["adapted"], 4)}
            logging.info("%s lr %g: %.4f -> %.4f", name, lr, r["icl"], r["adapted"])
    print(json.dumps({"setting": args.setting, "steps": args.steps, "tasks": [t.name for t in source.held_out],
                      "starts": out, "seconds": round(time.perf_counter() - t0)}))


if __name__ == "__main__":
    main()
