"""A meta-training run: load the model and tasks, start or resume, step the `MetaTrainer` to the
end, checkpointing as it goes (running, stopped, failed, done) and logging a summary every few steps."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm

from model import checkpoints
from model.optim import AdamState
from model.lm import LM, LoraSpec
from model.meta.checkpoint import resume, run_meta
from model.meta.outer import MetaTrainer
from model.meta.tasks import TaskSource, task_source
from model.meta_config import MetaTrainConfig

log = logging.getLogger("mamlserve.meta_train")

Progress = Callable[[int, int, dict[str, Any]], None]


def meta_train(
    config: MetaTrainConfig,
    lm: LM | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    source: TaskSource | None = None,
    registry: checkpoints.Where | None = None,
) -> str:
    """Run (or resume) a meta-training run; returns the id of the checkpoint it wrote.

    progress(step, total, metrics) is called after every outer step; should_stop() before
    each: when it returns True the run checkpoints where it is (status "stopped") and returns.
    registry: where checkpoints are read and written (default: the config's data dir).
    """
    cfg = config
    if lm is None:
        from model.loading import load_for_autocast

        lm = load_for_autocast(cfg.base_model, cfg.dir, cfg.device, LoraSpec.of(cfg))
    source = source or task_source(cfg.setting, None if cfg.setting == "synthetic" else cfg.dir)
    reg = registry if registry is not None else cfg.dir
    params, state, step, parent, history = None, None, 0, None, []
    if cfg.resume:
        cfg, params, state, step, history = resume(cfg, lm, reg)
        parent = cfg.resume
    trainer = MetaTrainer(cfg, lm, source, params or {}, state or AdamState(betas=tuple(cfg.betas)), step)
    ckpt_id = checkpoints.new_id(reg, cfg.method, cfg.space, cfg.setting)
    log.info("meta-training %s: %s/%s on %s (%d meta-train tasks), steps %d..%d, model %s",
             ckpt_id, cfg.method, cfg.space, cfg.setting, len(source.meta_train), step, cfg.steps, lm.name)

    def save(status: str) -> None:
        checkpoints.save(reg, ckpt_id, trainer.params, trainer.state,
                         run_meta(cfg, lm, source, status, trainer.step_no, parent, history))

    save("running" if trainer.step_no < cfg.steps else "done")
    status = "done"
    bar = tqdm(total=cfg.steps, initial=trainer.step_no, desc=f"{cfg.method}/{cfg.space}", disable=None)
    window: list[dict] = []
    try:
        while trainer.step_no < cfg.steps:
            if should_stop and should_stop():
                status = "stopped"
                break
            log_now = (trainer.step_no + 1) % cfg.log_every == 0 or trainer.step_no + 1 == cfg.steps
            m = trainer.step(track_before=log_now)
            window.append(m)
            bar.update(1)
            bar.set_postfix(loss=f"{m['query_loss']:.3f}")
            if log_now:
                line = _summary(window)
                history.append(line)
                window = []
                log.info("step %d/%d query loss %s -> %.4f (before -> after inner steps), support %s, |g| %.3g, %.0f tok/s",
                         line["step"], cfg.steps, _fmt(line["query_loss_before"]), line["query_loss"],
                         _fmt(line["support_loss"]), line["grad_norm"], line["tokens_per_s"] or 0)
            if progress:
                progress(trainer.step_no, cfg.steps, {k: v for k, v in m.items() if k != "tasks"})
            if cfg.save_every and trainer.step_no % cfg.save_every == 0 and trainer.step_no < cfg.steps:
                save("running")
    except BaseException:
        save("failed")  # keep what was learned; a resume can continue from it
        raise
    finally:
        bar.close()
    save(status)
    return ckpt_id


def _summary(window: list[dict]) -> dict[str, Any]:
    def mean(key):
        xs = [m[key] for m in window if m.get(key) is not None]
        return sum(xs) / len(xs) if xs else None

    secs = sum(m["seconds"] for m in window)
    return {"step": window[-1]["step"], "query_loss": mean("query_loss"), "query_loss_before": mean("query_loss_before"),
            "support_loss": mean("support_loss"), "grad_norm": mean("grad_norm"),
            "tokens_per_s": sum(m["tokens"] for m in window) / secs if secs else None, "seconds": secs}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"

