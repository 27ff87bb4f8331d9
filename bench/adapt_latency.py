"""Seconds to adapt SmolLM2 to a 16-demonstration task with the service's default recipe
(`model.recipe.DEFAULT`, with MAMLSERVE_ADAPT_RECIPE's overrides), LoRA and full, in one run.

The support loss before/after is printed so a fast-but-useless run shows. --steps pins the
number of steps (the recipe's schedule otherwise follows the demonstrations).

    python bench/adapt_latency.py [--model smollm2] [--steps N] [--device auto] [--repeats 3]
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
from model.adapt import adapt  # noqa: E402
from model.recipe import DEFAULT  # noqa: E402
from model.loading import load_lm  # noqa: E402
from model.settings import get_settings  # noqa: E402
from model.task import Example, Task  # noqa: E402

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "topics.json"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--steps", type=int, default=None, help="pin the steps (default: the recipe's schedule for the shots)")
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
    recipe = DEFAULT.but(**s.adapt_recipe)
    if args.steps is not None:
        recipe = recipe.but(min_steps=args.steps, max_steps=args.steps)
    for mode in ("lora", "full"):  # warm-up: allocator, kernels, first-use library loads
        adapt(lm, task, recipe.but(min_steps=1, max_steps=1), mode)

    out = {"model": args.model, "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."),
           "threads": torch.get_num_threads(), "steps": recipe.steps_for(len(task.demonstrations))}
    for mode in ("lora", "full"):
        times = []
        for _ in range(args.repeats):
            sync(lm.device)
            t0 = time.perf_counter()
            a = adapt(lm, task, recipe, mode)
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
