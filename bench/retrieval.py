"""What retrieval in context (Recipe.retrieve) costs against the shared-prefix path, on the tiny model:
the same queries scored with one fixed prefix for all, and with each query's nearest demonstrations
(one prefix per distinct set); one-time embedding of the demonstrations apart. Last line: JSON."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from model.loading import load_lm
from model.prompts import Formatter
from model.recipe import DEFAULT
from model.retrieval import contexts, embed, grouped
from model.scoring import predict
from model.task import Task

WORDS = "good bad great awful fine poor lovely dull bright dark warm cold quick slow happy sad".split()


def make_task(n: int, labels: int, rng: random.Random) -> Task:
    options = [f"label{j}" for j in range(labels)]
    demos = [{"input": " ".join(rng.choices(WORDS, k=rng.randint(4, 12))), "output": options[i % labels]}
             for i in range(n)]
    return Task(demonstrations=demos, options=options)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=500, help="demonstrations (far more than fit the budget)")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--labels", type=int, default=3)
    ap.add_argument("--ks", default="4,16", help="retrieve values to compare")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    lm = load_lm("tiny", Path("/nonexistent-unused"))
    fmt = Formatter(lm.encode)
    task = make_task(args.n, args.labels, rng)
    queries = make_task(args.queries, args.labels, rng).demonstrations
    fixed = DEFAULT.but(retrieve=None)
    shown = fmt.prefix(None, task.demonstrations, 40)[1]

    t = time.perf_counter()
    emb = embed(lm, [d.input for d in task.demonstrations])
    embed_s = time.perf_counter() - t
    shared_s = timed(lambda: predict(lm, task, queries, recipe=fixed, fmt=fmt), args.repeats)
    out = {"n": args.n, "queries": args.queries, "fixed_prompt_demos": shown, "embed_demos_s": round(embed_s, 4),
           "shared_s": round(shared_s, 4)}
    print(f"n={args.n}, {args.queries} queries; the fixed prompt shows {shown}; embedding the demonstrations once: "
          f"{embed_s:.3f} s; shared prefix: {shared_s:.3f} s")
    for k in (int(x) for x in args.ks.split(",")):
        recipe = DEFAULT.but(retrieve=k)
        s = timed(lambda: predict(lm, task, queries, recipe=recipe, fmt=fmt, embeddings=emb), args.repeats)
        rows = [max(len(r.ctx) + len(r.target) for r in fmt.candidates(q.input, task.options)) for q in queries]
        n_groups = len(grouped(contexts(lm, fmt, task, recipe, queries, rows, emb)))
        print(f"retrieve={k}: {s:.3f} s, {n_groups} distinct sets (prefixes), {s / shared_s:.2f}x the shared prefix")
        out.update({f"retrieve{k}_s": round(s, 4), f"retrieve{k}_groups": n_groups,
                    f"retrieve{k}_ratio": round(s / shared_s, 2)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
