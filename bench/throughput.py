"""Throughput on this machine, in one run on the same model: prediction items/s (the service's
path against the naive per-option forward), the default recipe's adaptation seconds at k=16,
and how much of the machine's measured fp32 matmul rate the adaptation achieves.

Prediction tasks (from the task bank, k=16 demonstrations in context as `mode: none` shows
them, 64 queries each): 2 options (rotten_tomatoes.sentiment), 4 (multiemo), 7 (intent, options
of up to 6 tokens that share beginnings), 26 (wordnet.lexname_noun), and a single-token set
(intent with its labels remapped to the letters A-G).

    ours   `model.scoring.predict` as the worker runs it: the prefix's KV cached per task, each query
           once on top of it with its options packed after it (no option pass at all for
           single-token sets)
    naive  what a straightforward implementation does: one forward per query over all its
           options, each option a full sequence (demonstrations + query + option), nothing cached

Adaptation FLOPs are counted, not guessed: forward hooks add up the tokens each decoder layer
actually runs (the frozen layers under the LoRA run once, then pass through) and whether a
backward will reach it; a layer costs 2 x its parameters per token, the head 2 x hidden x
vocabulary per logit row, and a backward about the same again for a LoRA (activation gradients
only; the frozen weights get none). The fraction is that rate over the
rate of a large fp32 matmul measured just before. Last line: JSON with `predict_items_per_s`,
`predict_speedup_vs_naive`, `adapt_s`, `adapt_flops_fraction` and the details.

    python bench/throughput.py            # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model  # noqa: E402,F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from model.adapt import adapt  # noqa: E402
from model.bank import kshot, load_bank  # noqa: E402
from model.lm import LoraSpec  # noqa: E402
from model.loading import load_lm  # noqa: E402
from model.prefix import build_prefix  # noqa: E402
from model.prompts import Formatter, longest  # noqa: E402
from model.recipe import DEFAULT, ICL  # noqa: E402
from model.scoring import predict  # noqa: E402
from model.settings import get_settings  # noqa: E402
from model.task import Task  # noqa: E402

TASKS = [("2 options", "rotten_tomatoes.sentiment", None), ("4 options", "bigbench.multiemo.all_sentence_en", None),
         ("7 options", "bigbench.intent_recognition", None), ("26 options", "wordnet.lexname_noun", None),
         ("single-token set", "bigbench.intent_recognition", "letters")]


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


@torch.no_grad()
def naive(lm, fmt: Formatter, task: Task, queries) -> list[str]:
    out = []
    for q in queries:
        rows = fmt.candidates(q.input, task.options)
        ids, _ = fmt.prefix(task.instruction, task.demonstrations, longest(rows))
        seqs = [ids + r.ctx + r.target for r in rows]
        n = max(len(s) for s in seqs)
        x = torch.full((len(seqs), n), lm.eos_id)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        logp = F.log_softmax(lm(None, input_ids=x, attention_mask=mask).logits.float(), -1)
        scores = []
        for i, r in enumerate(rows):
            a = len(ids) + len(r.ctx) - 1
            scores.append(logp[i, a: a + len(r.target)].gather(1, torch.tensor(r.target)[:, None]).mean().item())
        out.append(task.options[max(range(len(rows)), key=scores.__getitem__)])
    return out


class TokenCounter:
    """Tokens each decoder layer ran, with and without a backward to come, and logit rows.

    Per layer, because the frozen layers under the LoRA run once per adaptation and are passed
    through afterwards (`model.prefix.Lower` swaps in a pass-through forward: not counted), and
    because no backward reaches the layers below the lowest LoRA layer."""

    def __init__(self, lm):
        self.fwd = self.bwd = self.logits = 0
        layers = [m for m in lm.model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]
        first = min((i % len(layers) for i in lm.lora.layers), default=0) if lm.lora.layers is not None else 0
        self.handles = [layer.register_forward_hook(self.hook(i >= first), with_kwargs=True) for i, layer in enumerate(layers)]
        self.handles.append(lm.model.get_base_model().lm_head.register_forward_hook(self.head_hook))

    def hook(self, trained_above: bool):
        def count(module, args, kwargs, out) -> None:
            if "forward" in module.__dict__:  # a pass-through of `Lower`: nothing computed
                return
            h = args[0] if args else kwargs["hidden_states"]
            n = h.shape[0] * h.shape[1]
            self.fwd += n
            if torch.is_grad_enabled() and trained_above:
                self.bwd += n
        return count

    def head_hook(self, module, args, out) -> None:
        self.logits += out.shape[0] * out.shape[1]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--naive-queries", type=int, default=16, help="the naive path is slow: fewer queries, same per-item rate")
    args = ap.parse_args()
    s = get_settings()
    lm = load_lm(s.base_model, s.data_dir, "cpu", LoraSpec.of(s))
    fmt = Formatter(lm.encode, s.prompt_format, s.context_tokens)
    bank = load_bank(s.data_dir)
    peak = matmul_gflops()
    from bench.adapt_quality import Remapped  # the same remapping as the quality bench

    predict_rows = {}
    for label, name, remap in TASKS:
        bt = bank.task(name)
        bt = Remapped(bt, remap) if remap else bt
        task, queries = kshot(bt, 16, 100, n_test=args.queries)
        prefix = build_prefix(lm, fmt, task, [r for q in queries for r in fmt.candidates(q.input, task.options)])
        predict(lm, task, queries[:2], recipe=ICL, fmt=fmt, prefix=prefix)  # warm
        t0 = time.perf_counter()
        ours = predict(lm, task, queries, recipe=ICL, fmt=fmt, prefix=prefix)
        ours_s = (time.perf_counter() - t0) / len(queries)
        t0 = time.perf_counter()
        theirs = naive(lm, fmt, task, queries[: args.naive_queries])
        naive_s = (time.perf_counter() - t0) / args.naive_queries
        agree = sum(a.output == b for a, b in zip(ours, theirs)) / len(theirs)
        predict_rows[label] = {"task": bt.name, "options": len(task.options), "items_per_s": 1 / ours_s,
                               "naive_items_per_s": 1 / naive_s, "speedup_vs_naive": naive_s / ours_s, "same_answers": agree}
        print(f"{label:18s} ours {1 / ours_s:6.2f} items/s   naive {1 / naive_s:6.2f} items/s   x{naive_s / ours_s:5.1f}"
              f"   same answers {agree:.0%}", flush=True)

    bt = bank.task("rotten_tomatoes.sentiment")
    task, _ = kshot(bt, 16, 100)
    adapt(lm, task, DEFAULT.but(epochs=0.1, min_steps=1, max_steps=1), "lora", fmt=fmt)  # warm
    times = []
    for _ in range(2):
        counter = TokenCounter(lm)
        t0 = time.perf_counter()
        a = adapt(lm, task, DEFAULT, "lora", fmt=fmt)
        times.append(time.perf_counter() - t0)
        counter.close()
    adapt_s = statistics.median(times)
    base = lm.model.get_base_model()
    per_layer = sum(p.numel() for n, p in base.named_parameters() if ".layers.0." in n and "lora_" not in n)
    hidden, vocab = base.config.hidden_size, base.config.vocab_size
    flops = 2 * per_layer * (counter.fwd + counter.bwd) + 2 * hidden * vocab * counter.logits * 2
    achieved = flops / adapt_s / 1e9
    print(f"adaptation (default recipe, k=16, {len(a.losses)} steps): {adapt_s:.1f} s, {counter.fwd} layer-tokens forward, "
          f"{counter.bwd} backward, {achieved:.1f} GFLOP/s of {peak:.1f} measured ({achieved / peak:.0%})")
    ratio = statistics.median(r["speedup_vs_naive"] for r in predict_rows.values())
    print(json.dumps({
        "predict_items_per_s": {k: round(v["items_per_s"], 2) for k, v in predict_rows.items()},
        "predict_speedup_vs_naive": {k: round(v["speedup_vs_naive"], 1) for k, v in predict_rows.items()},
        "predict_speedup_vs_naive_median": round(ratio, 1),
        "adapt_s": round(adapt_s, 1), "adapt_steps": len(a.losses), "adapt_gflops": round(achieved, 1),
        "matmul_gflops": round(peak, 1), "adapt_flops_fraction": round(achieved / peak, 3),
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
