"""Seconds to adapt SmolLM2 to a 16-demonstration task with 5 inner steps, LoRA and full, in one run.

The inner steps are the service's defaults (batch of 4 leave-one-out queries, 4 context
demonstrations each); the support loss before/after is printed so a fast-but-useless run
shows. Goal: LoRA <= 30 s on 2 CPU cores, <= 1 s on a CUDA device.

    python bench/adapt_latency.py [--model smollm2] [--steps 5] [--device auto] [--repeats 3]
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from model.adapt import adapt
from model.loading import load_lm
from model.settings import get_settings
from model.task import Example, Task

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "topics.json"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode; the median is reported")
    args = ap.parse_args()
    s = get_settings()

    data = json.loads(FIXTURE.read_text())
    demos = [Example(**e) for e in data["examples"]][:: max(1, 30 // args.shots)][: args.shots]
    task = Task(demonstrations=demos, instruction=data["instruction"], options=data["options"])
    lm = load_lm(args.model, s.data_dir, device=args.device, dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    for mode in ("lora", "full"):  # warm-up: allocator, kernels, first-use library loads
        adapt(lm, task, mode, steps=1, lr=s.adapt_lr_lora)

    out = {"model": args.model, "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."), "threads": torch.get_num_threads(), "steps": args.steps}
    for mode, lr in (("lora", s.adapt_lr_lora), ("full", s.adapt_lr_full)):
        times = []
        for _ in range(args.repeats):
            sync(lm.device)
            t0 = time.perf_counter()
            a = adapt(lm, task, mode, steps=args.steps, lr=lr, batch_size=s.adapt_batch_size,
                      context_demos=s.adapt_context_demos)
            sync(lm.device)
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        print(f"{mode}: {dt:.2f} s (runs {', '.join(f'{x:.2f}' for x in times)}), support loss {a.loss_before:.3f} -> {a.loss_after:.3f}")
        out[f"{mode}_s"] = round(dt, 3)
        out[f"{mode}_loss"] = [round(a.loss_before, 4), round(a.loss_after, 4)]
    out["full_over_lora"] = round(out["full_s"] / out["lora_s"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
