"""Throughput of one meta-training step per method and parameter space (tokens/s; MFU on CUDA).

A step is what `MetaTrainer.step` does: `tasks` tasks, each with `inner_steps` inner steps on
`support_batch` support sequences (maml, fomaml, reptile) and one query batch of `query`
sequences; MetaICL only the query batch. Contexts are sampled (`--inner-context sampled`, the
default here: sequences of a controlled length) or the prediction prompt (`recipe`: the support
set as a shared prompt; task-by-task only, batched runs are skipped). tokens = every token that goes through the model in the step
(support tokens once per inner step, plus query tokens); tokens/s = tokens / median step time.
MFU = FLOPs of one step, counted by `torch.utils.flop_counter.FlopCounterMode` on the real
step (matmuls and attention; forward, backward and the double backward of second order), per
second, over the GPU's dense bf16 peak. Gradient checkpointing's recompute is counted (so with
--grad-checkpointing it is hardware, not model, FLOPs utilisation).

Sequences are long synthetic classification examples (random words) packed with in-context
demonstrations up to --seq tokens, so lengths are controlled. The model is the real one
("smollm2", "tiny") or a randomly initialised llama of a named shape ("rand-smollm2" has
SmolLM2-135M's exact architecture; "rand-1b" a 1.2B llama): throughput does not depend on
the weights, and a random model needs no files.

    python bench/meta_step.py --model smollm2 --seq 256 --steps 2
    python bench/meta_step.py --model rand-1b --device cuda --seq 1024 --tasks 2 --support-batch 8 --query 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.lm import LM, LoraSpec  # noqa: E402
from model.meta_train import MetaTrainConfig, MetaTrainer, SynthTask, TaskSource, synthetic_task  # noqa: E402
from model.task import Example  # noqa: E402

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "rand-smollm2": (576, 30, 9, 3, 1536, 49152),
    "rand-360m": (960, 32, 15, 5, 2560, 49152),
    "rand-1b": (2048, 16, 32, 8, 8192, 49152),
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s


def random_llama(shape: str, device: str, lora: LoraSpec) -> LM:
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.tiny import tiny_tokenizer

    h, n, heads, kv, inter, vocab = SHAPES[shape]
    tok = tiny_tokenizer()  # ids < 512: any vocabulary size above that works
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=inter, num_hidden_layers=n,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).float().eval()
    return LM.wrap(model, tok, name=shape, sha256=hashlib.sha256(shape.encode()).hexdigest(), lora=lora)


def long_source(words: int, n_tasks: int = 8) -> TaskSource:
    """Synthetic tasks whose inputs are `words` random words long: controlled sequence lengths."""
    tasks = []
    for i in range(n_tasks):
        t = synthetic_task(i, seed=99, n_train=64, n_test=4)
        rng = random.Random(i)
        pad = "movie great loved terrible boring quick brown fox jumps lazy dog paris".split()

        def stretch(e: Example) -> Example:
            return Example.model_construct(input=e.input + " " + " ".join(rng.choice(pad) for _ in range(words)),
                                           output=e.output, options=None)

        tasks.append(SynthTask(t.name, t.options, [stretch(e) for e in t.train], [stretch(e) for e in t.test]))
    return TaskSource("synthetic-long", tasks, [])


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(lm: LM, source: TaskSource, method: str, space: str, args, batched: bool = False) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    cfg = MetaTrainConfig(method=method, space=space, setting="synthetic-long", tasks_per_step=args.tasks,
                          batch_tasks=batched, inner_context=args.inner_context,
                          inner_steps=args.inner_steps, support_size=args.support_batch + 2,
                          support_batch=args.support_batch, query_size=args.query, context_demos=args.demos,
                          context_tokens=args.seq, grad_checkpointing=args.grad_checkpointing,
                          inner_lr=1e-3 if space == "lora" else 1e-5, outer_lr=1e-4 if space == "lora" else 1e-6)
    tr = MetaTrainer(cfg, lm, source)
    dev = lm.device
    for _ in range(args.warmup):
        tr.step()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, tokens = [], []
    for _ in range(args.steps):
        sync(dev)
        t0 = time.perf_counter()
        m = tr.step()
        sync(dev)
        times.append(time.perf_counter() - t0)
        tokens.append(m["tokens"])
    dt = statistics.median(times)
    out = {"method": method, "space": space, "batched": batched, "step_s": dt, "tokens_per_step": statistics.mean(tokens),
           "tokens_per_s": statistics.mean(tokens) / dt}
    if dev.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        try:
            with FlopCounterMode(display=False) as fc:
                m = tr.step()
        except Exception as e:  # seen on an H100: "sdpa_flop_count: query/key/value shapes are incompatible" (GQA)
            out["mfu_error"] = f"FlopCounterMode: {e}"
            return out
        flops = fc.get_total_flops() * statistics.mean(tokens) / m["tokens"]  # same step size as timed
        out["tflops_per_step"] = flops / 1e12
        peak = peak_flops(dev)
        if peak:
            out["mfu"] = flops / dt / peak
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="smollm2 | tiny | a HF folder | " + " | ".join(SHAPES))
    ap.add_argument("--methods", default="maml,fomaml,reptile,metaicl")
    ap.add_argument("--inner-context", choices=["sampled", "recipe"], default="sampled")
    ap.add_argument("--spaces", default="lora,full")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (prompt budget)")
    ap.add_argument("--words", type=int, default=12, help="words per synthetic input")
    ap.add_argument("--demos", type=int, default=4, help="demonstrations in context of each sequence")
    ap.add_argument("--tasks", type=int, default=1)
    ap.add_argument("--inner-steps", type=int, default=1)
    ap.add_argument("--support-batch", type=int, default=2)
    ap.add_argument("--query", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--batch-tasks", choices=["off", "on", "both"], default="both",
                    help="the step's tasks one by one, as one vmapped batch, or both side by side (with --tasks > 1)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--data-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from model.loading import load_for_autocast, resolve_device
    from model.settings import get_settings

    dev = resolve_device(args.device)
    if args.model in SHAPES:
        lm = random_llama(args.model, str(dev), LoraSpec())
    else:
        lm = load_for_autocast(args.model, args.data_dir or get_settings().data_dir, str(dev), LoraSpec())
    source = long_source(args.words)
    results = {}
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.batch_tasks]
    if args.inner_context == "recipe":
        modes = [b for b in modes if not b]  # the prediction prompt has no vmapped path (MetaTrainConfig says so)
    configs = [(m, sp, b) for sp in args.spaces.split(",") for m in args.methods.split(",") for b in modes]
    for method, space, batched in configs:
        try:
            r = bench(lm, source, method, space, args, batched)
        except torch.OutOfMemoryError as e:  # report it and go on with the other configurations
            r = {"method": method, "space": space, "batched": batched, "error": f"out of memory: {str(e)[:200]}"}
            torch.cuda.empty_cache()
        results[f"{method}/{space}" + ("+batched" if batched else "")] = r
        print(json.dumps(r), flush=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    final = {
        "model": lm.name, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "seq": args.seq, "tasks": args.tasks, "support_batch": args.support_batch, "query": args.query,
        "inner_steps": args.inner_steps, "grad_checkpointing": args.grad_checkpointing,
        "tokens_per_s": {k: round(v["tokens_per_s"], 1) for k, v in results.items() if "tokens_per_s" in v},
        "errors": {k: v["error"] for k, v in results.items() if "error" in v},
        "mfu": {k: round(v["mfu"], 4) for k, v in results.items() if "mfu" in v},
        # tokens/s batched over task by task, measured in this run
        "batched_speedup": {k: round(results[k + "+batched"]["tokens_per_s"] / v["tokens_per_s"], 3)
                            for k, v in results.items()
                            if "tokens_per_s" in v and "tokens_per_s" in results.get(k + "+batched", {})},
    }
    print(json.dumps(final))


if __name__ == "__main__":
    main()
