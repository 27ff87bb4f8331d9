"""The meta-training command line: flags over the environment's settings, one run, the checkpoint id
printed (python -m model.meta_train --setting S --method maml --space lora)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from model.meta.run import meta_train
from model.meta_config import MetaTrainConfig


def main(
    setting: str = "class_to_class",
    method: str = "maml",
    space: str = "lora",
    model: str | None = None,
    steps: int = 100,
    tasks_per_step: int = 4,
    inner_steps: int = 1,
    inner_lr: float | None = None,
    outer_lr: float | None = None,
    support_size: int = 8,
    support_batch: int = 4,
    query_size: int = 4,
    context_demos: int = 4,
    inner_context: str | None = None,
    remap: float = 0.0,
    shared_moments: bool | None = None,
    context_tokens: int = 256,
    grad_checkpointing: bool = False,
    batch_tasks: bool = False,
    seed: int = 0,
    log_every: int = 10,
    save_every: int = 0,
    resume: str | None = None,
    device: str | None = None,
    data_dir: Path | None = None,
) -> None:
    """Meta-train and print the checkpoint id (python -m model.meta_train --setting S --method maml --space lora).

    --method: maml | fomaml | reptile | metaicl; --inner-context: recipe | sampled (default: recipe for a new
    run, the checkpoint's own for --resume); --remap P: share of episodes with labels replaced by symbols."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from model.settings import get_settings  # a command-line edge: the environment's settings, then the flags

    # only when given: an unset inner_context lets a resumed run keep its checkpoint's (resumed_config)
    given = {"inner_context": inner_context, "base_model": model, "device": device, "data_dir": data_dir}
    cfg = MetaTrainConfig.of(
        get_settings(), method=method, space=space, setting=setting, steps=steps, tasks_per_step=tasks_per_step,
        inner_steps=inner_steps, inner_lr=inner_lr, outer_lr=outer_lr, support_size=support_size,
        support_batch=support_batch, query_size=query_size, context_demos=context_demos, remap=remap,
        shared_moments=shared_moments, context_tokens=context_tokens, grad_checkpointing=grad_checkpointing,
        batch_tasks=batch_tasks, seed=seed, log_every=log_every, save_every=save_every, resume=resume,
        **{k: v for k, v in given.items() if v is not None},
    )
    # SIGTERM or Ctrl-C ends the run after the step under way, checkpointed as "stopped" (resumable):
    # how a run is held to a time budget, or stopped to free the machine
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(meta_train(cfg, should_stop=stop.is_set))
