"""Per-query prediction latency with and without the demonstration prefix cache, side by side.

A 5-option topic task (hand-written headlines, tests/fixtures/topics.json) with 16
demonstrations on SmolLM2; each query scores its 5 options in one batch. The cached path
encodes the prefix once per task (as the worker does) and reuses it; the uncached path
recomputes the whole prompt for every query. Runs are interleaved so machine noise hits both.

    python bench/predict_latency.py [--model smollm2] [--queries 12]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model  # noqa: E402,F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)
import torch  # noqa: E402
from model.loading import load_lm  # noqa: E402
from model.prefix import build_prefix  # noqa: E402
from model.prompts import Formatter  # noqa: E402
from model.scoring import predict  # noqa: E402
from model.settings import get_settings  # noqa: E402
from model.task import Example, Task  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "topics.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--queries", type=int, default=12)
    ap.add_argument("--shots", type=int, default=16)
    args = ap.parse_args()

    data = json.loads(FIXTURE.read_text())
    examples = [Example(**e) for e in data["examples"]]
    # 16 demonstrations, balanced over the 5 labels as far as 16 allows; the rest are queries
    by_label = {o: [e for e in examples if e.output == o] for o in data["options"]}
    demos = [by_label[o][i] for i in range(4) for o in data["options"]][: args.shots]
    queries = [e for e in examples if e not in demos][: args.queries]
    task = Task(demonstrations=demos, instruction=data["instruction"], options=data["options"])

    lm = load_lm(args.model, get_settings().data_dir)
    fmt = Formatter(lm.encode)
    rows = [r for q in queries for r in fmt.candidates(q.input, task.options)]
    t0 = time.perf_counter()
    prefix = build_prefix(lm, fmt, task, rows)  # once per task, as the worker does
    prefix_ms = (time.perf_counter() - t0) * 1000

    cached, uncached, agree = [], [], 0
    predict(lm, task, queries[:1], prefix=prefix)  # warm-up
    for q in queries:
        t0 = time.perf_counter()
        a = predict(lm, task, [q], prefix=prefix)[0]
        cached.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        b = predict(lm, task, [q], cache=False)[0]
        uncached.append((time.perf_counter() - t0) * 1000)
        agree += a.output == b.output
    c, u = statistics.median(cached), statistics.median(uncached)
    print(f"prefix: {len(prefix.ids)} tokens, {prefix.n_demos} demos, encoded once in {prefix_ms:.0f} ms")
    print(f"cached p50 {c:.1f} ms  uncached p50 {u:.1f} ms  agreement {agree}/{len(queries)}")
    print(json.dumps({
        "model": args.model, "device": str(lm.device), "threads": torch.get_num_threads(), "queries": len(queries),
        "prefix_tokens": len(prefix.ids), "p50_ms_cached": round(c, 1), "p50_ms_uncached": round(u, 1),
        "speedup": round(u / c, 2),
    }))


if __name__ == "__main__":
    main()
