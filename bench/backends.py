"""Which backend knobs pay on this CPU: three questions, measured side by side in one run on
SmolLM2-135M with rotten_tomatoes.sentiment at k=16 (the same task, prefix and queries throughout).

1. Attention: the model loaded with attn="sdpa" (the default) against attn="eager", timing one
   default-recipe adaptation at epochs=1 (16 demonstrations, 2 Adam steps, plus the support
   losses and the calibration prior that `adapt` computes) and `predict` of 16 queries on a
   cached prefix; and whether the two give the same option scores.
2. torch.compile(dynamic=True) of the HF model's forward (under peft and `functional_call`, as
   `LM.__call__` runs it): the first call's compile time, then the steady-state speedup of the
   same prediction and of the adaptation. Each first (compiling) call is cut off after --cap
   seconds, and adaptation, which compiled ~2.5x as long as prediction on the tiny model, is
   tried only if prediction compiled within cap / 2.5. A failure or a cutoff is recorded in the
   JSON (truncated), as are dynamo's graph breaks.
3. Batching headroom: predict items/s at 1, 4, 16 and 64 queries per `predict` call. If the
   per-item time barely falls past batch 4, batching queries of many tasks into one forward
   (S-LoRA-style cross-task LoRA batching) cannot win much here. Note: `score_rows` runs at
   most 32 queries per forward, so batch 64 is two forwards of 32.

The machine is noisy (2 cores, often shared): variants run interleaved (A, B, A, B, ...) and
each figure is a median; ratios are the point, not absolute seconds. Last line: JSON with
`sdpa_vs_eager_adapt` and `sdpa_vs_eager_predict` (eager s / sdpa s), `backend_max_score_diff`,
`compile`, `batch_items_per_s` and a one-line `verdict`.

    python bench/backends.py                      # ~10 min on 2 cores, up to 5 of them compiling
    python bench/backends.py --quick --cap 200    # 2 repetitions: 7 min (bench/results/backends.txt)
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model  # noqa: E402,F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)
import torch  # noqa: E402
from model.adapt import adapt  # noqa: E402
from model.bank import kshot, load_bank  # noqa: E402
from model.lm import LoraSpec  # noqa: E402
from model.loading import load_lm  # noqa: E402
from model.prefix import build_prefix  # noqa: E402
from model.prompts import Formatter  # noqa: E402
from model.recipe import DEFAULT, ICL  # noqa: E402
from model.scoring import predict  # noqa: E402
from model.settings import get_settings  # noqa: E402

STEP = DEFAULT.but(epochs=1)  # 16 demonstrations in batches of 8: 2 Adam steps
WARM = DEFAULT.but(epochs=0.1, max_steps=1, calibrate=False)  # one step: first-backward costs out of the way


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each fn, run A, B, A, B, ... so that load from elsewhere hits all alike."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def max_diff(a, b) -> float:
    return max(abs(x.scores[o] - y.scores[o]) for x, y in zip(a, b) for o in x.scores)


def short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


class Cutoff(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` inside dynamo swallows it."""


def capped(fn, cap: float):
    """fn() cut off after `cap` seconds (SIGALRM: the main thread, where compiling runs)."""
    def ring(*_):
        raise Cutoff(f"did not finish within {cap:.0f} s")
    signal.signal(signal.SIGALRM, ring)
    signal.alarm(int(cap))
    try:
        return fn()
    finally:
        signal.alarm(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 repetitions instead of 3")
    ap.add_argument("--model", help="model spec (default: the settings' base model; 'tiny' for a smoke test)")
    ap.add_argument("--cap", type=float, default=300, help="seconds allowed for each compiling call")
    args = ap.parse_args()
    reps = 2 if args.quick else 3
    s = get_settings()
    spec = args.model or s.base_model
    lms = {a: load_lm(spec, s.data_dir, "cpu", LoraSpec.of(s), attn=a) for a in ("sdpa", "eager")}
    fmt = Formatter(lms["sdpa"].encode, s.prompt_format, s.context_tokens)
    task, queries = kshot(load_bank(s.data_dir).task("rotten_tomatoes.sentiment"), 16, 100, n_test=64)
    rows = [r for q in queries for r in fmt.candidates(q.input, task.options)]
    prefix = {a: build_prefix(lm, fmt, task, rows) for a, lm in lms.items()}

    def pred(a, qs):
        return lambda: predict(lms[a], task, qs, recipe=ICL, fmt=fmt, prefix=prefix[a])

    def step(a):
        return lambda: adapt(lms[a], task, STEP, "lora", fmt=fmt)

    # 1. attention backend
    out = {a: pred(a, queries[:16])() for a in lms}  # also the warm-up
    diff = max_diff(out["sdpa"], out["eager"])
    losses = {a: adapt(lm, task, WARM, "lora", fmt=fmt).losses for a, lm in lms.items()}
    loss_diff = abs(losses["sdpa"][0] - losses["eager"][0])
    p = interleaved({a: pred(a, queries[:16]) for a in lms}, reps)
    t = interleaved({a: step(a) for a in lms}, reps)
    print(f"predict 16: sdpa {p['sdpa']:.2f} s, eager {p['eager']:.2f} s   adapt (2 steps): sdpa {t['sdpa']:.1f} s, "
          f"eager {t['eager']:.1f} s   max score diff {diff:.2e}, first loss diff {loss_diff:.2e}", flush=True)

    # 3. batching headroom (before compiling, which replaces the sdpa model's forward)
    def calls(b):
        n = max(b, 16)  # at least 16 items per timing, so that batch 1 is not one noisy call
        return lambda: [pred("sdpa", queries[i: i + b])() for i in range(0, n, b)]

    bt = interleaved({b: calls(b) for b in (1, 4, 16, 64)}, reps)
    batch = {b: max(b, 16) / v for b, v in bt.items()}
    print("items/s by queries per call: " + ", ".join(f"{b}: {v:.2f}" for b, v in batch.items()), flush=True)

    # 2. torch.compile: the HF model's forward (peft's LoRA layers live inside it, functional_call swaps its params)
    import torch._dynamo

    base = lms["sdpa"].model.get_base_model()
    plain, compiled = base.forward, torch.compile(base.forward, dynamic=True)
    comp: dict = {}

    def use(fwd, fn):
        def run():
            base.forward = fwd
            try:
                return fn()
            finally:
                base.forward = plain
        return run

    try:
        t0 = time.perf_counter()
        got = capped(use(compiled, pred("sdpa", queries[:16])), args.cap)
        comp["compile_s"] = round(time.perf_counter() - t0, 1)
        comp["max_score_diff"] = max_diff(got, out["sdpa"])
        capped(use(compiled, pred("sdpa", queries[16:32])), args.cap)  # another shape: a recompile, if dynamic=True does not hold
        v = interleaved({"plain": pred("sdpa", queries[:16]), "compiled": use(compiled, pred("sdpa", queries[:16]))}, reps)
        comp["speedup_predict"] = round(v["plain"] / v["compiled"], 2)
    except (Exception, Cutoff) as e:  # noqa: BLE001  (any failure is the answer to record)
        traceback.print_exc()
        comp["error"] = short(e)
    print(f"compile (predict): {comp}", flush=True)
    if "error" in comp:
        pass
    elif comp["compile_s"] > args.cap / 2.5:
        comp["adapt_error"] = f"skipped: prediction compiled in {comp['compile_s']} s, adaptation would take > {args.cap:.0f} s"
    else:
        try:
            comp["adapt_compile_s"] = round(timed(lambda: capped(use(compiled, step("sdpa")), args.cap)), 1)
            v = interleaved({"plain": step("sdpa"), "compiled": use(compiled, step("sdpa"))}, reps)
            comp["speedup_adapt"] = round(v["plain"] / v["compiled"], 2)
        except (Exception, Cutoff) as e:  # noqa: BLE001
            traceback.print_exc()
            comp["adapt_error"] = short(e)
    breaks = torch._dynamo.utils.counters["graph_break"]
    comp["graph_breaks"] = sum(breaks.values())
    if breaks:
        comp["graph_break_reasons"] = [r[:150] for r in list(breaks)[:3]]
    print(f"compile: {comp}", flush=True)

    adapt_ratio, pred_ratio = t["eager"] / t["sdpa"], p["eager"] / p["sdpa"]
    per_item = batch[4] / batch[64]  # per-item time at 64 over that at 4
    verdict = (f"{'sdpa' if adapt_ratio >= 1 else 'eager'} is faster for adaptation (x{max(adapt_ratio, 1 / adapt_ratio):.2f}); "
               f"compile {('failed (%s)' % comp['error'][:60]) if 'error' in comp else 'gives x%.2f on prediction' % comp['speedup_predict']}; "
               f"per-item time at batch 64 is {per_item:.2f}x batch 4's: cross-task batching "
               f"{'cannot win much' if per_item > 0.85 else 'could pay'} on this CPU")
    print(json.dumps({
        "sdpa_vs_eager_adapt": round(adapt_ratio, 3), "sdpa_vs_eager_predict": round(pred_ratio, 3),
        "backend_max_score_diff": diff, "backend_first_loss_diff": loss_diff, "compile": comp,
        "batch_items_per_s": {str(b): round(v, 2) for b, v in batch.items()},
        "seconds": {"sdpa_adapt": round(t["sdpa"], 2), "eager_adapt": round(t["eager"], 2),
                    "sdpa_predict16": round(p["sdpa"], 2), "eager_predict16": round(p["eager"], 2)},
        "threads": torch.get_num_threads(), "reps": reps, "verdict": verdict,
    }))


if __name__ == "__main__":
    main()
