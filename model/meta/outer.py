"""The outer loop: `MetaTrainer` holds θ and the outer Adam state, draws each step's tasks, averages
their meta-gradients, clips and takes the Adam step, and reports the step's metrics."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from model.optim import AdamState, adam_update
from model.lm import LM, Params
from model.meta.batching import BatchedTasks
from model.meta.episodes import Draw, context_episodes, fits, fitting_episode
from model.meta.forward import grad_checkpointing, training_mode
from model.meta.method import TaskMethod
from model.meta.tasks import TaskSource
from model.meta_config import MetaTrainConfig

log = logging.getLogger("mamlserve.meta_train")


def initial_params(lm: LM, space: str, seed: int) -> Params:
    """θ₀: a fresh LoRA init (B=0: the model starts unchanged) or a copy of the base weights, fp32."""
    src = lm.lora_init(seed) if space == "lora" else lm.params("full")
    return {k: v.detach().clone().float() for k, v in src.items()}


def _ordered(tensors: Params, names: Sequence[str]) -> Params:
    """tensors with the keys in `names` first, in that order (any others after, as they came)."""
    known = set(names)
    return {k: tensors[k] for k in names if k in tensors} | {k: v for k, v in tensors.items() if k not in known}


@dataclass
class MetaTrainer(BatchedTasks, TaskMethod):
    """Meta-training's state (θ, the outer Adam state, the step count) and its outer step; what a
    task contributes is `TaskMethod.task_step` (model/meta/method.py), or `batched_step` for all
    of a step's tasks at once (model/meta/batching.py)."""

    cfg: MetaTrainConfig
    lm: LM
    source: TaskSource
    params: Params = field(default_factory=dict)
    state: AdamState = field(default_factory=AdamState)
    step_no: int = 0

    def __post_init__(self) -> None:
        self.fmt = self.cfg.formatter(self.lm)
        self.max_row = self.cfg.context_tokens // 2  # leave the other half for demonstrations
        if not self.params:
            self.params = initial_params(self.lm, self.cfg.space, self.cfg.seed)
        if self.state.t == 0 and not self.state.m:  # a fresh run: the config's betas
            self.state = AdamState(betas=tuple(self.cfg.betas))
        # The model's own parameter order, whatever order a checkpoint handed them out in: a
        # step sums over the parameters (the meta-gradient's norm), and float addition depends
        # on the order, so a resumed run must add in the order of a fresh one to stay bit-exact.
        order = self.lm.lora_names if self.cfg.space == "lora" else self.lm.full_names
        self.params = _ordered(self.params, order)
        self.state = AdamState(_ordered(self.state.m, order), _ordered(self.state.v, order), self.state.t,
                               self.state.betas, self.state.eps)
        self.tasks = [t for t in self.source.meta_train if self._usable(t)]
        if not self.tasks:
            raise ValueError(f"setting {self.source.setting!r} has no meta-train task whose examples fit "
                             f"{self.max_row} tokens")
        if len(self.tasks) < len(self.source.meta_train):
            log.info("%d of %d meta-train tasks have too few examples within %d tokens; left out",
                     len(self.source.meta_train) - len(self.tasks), len(self.source.meta_train), self.max_row)

    def _usable(self, task: Any) -> bool:
        """At least half of the first 32 train examples (and 8 in all) fit max_row: episodes can be drawn."""
        head = task.train[:32]
        fit = sum(fits(self.fmt, e, self.max_row) for e in head)
        return fit >= 8 and fit * 2 >= len(head)

    def rng(self, step: int) -> random.Random:
        """The step's draws (tasks and examples): seeded by (seed, step), no global RNG read, so a
        run resumed from a checkpoint (params, Adam state, step) continues exactly as an
        uninterrupted one."""
        return random.Random(f"meta:{self.cfg.seed}:{step}")  # a str seed is hashed with sha512: stable across runs

    def step(self, track_before: bool = False) -> dict[str, Any]:
        """One outer step; returns its metrics.

        1. draw `tasks_per_step` meta-train tasks; from each, a support set (`support_size`
           examples) and disjoint query examples (`query_size`), all from the task's train split;
        2. per task, the method's task loss at the current meta-parameters θ (the LoRA init on a
           frozen base, or the full weights): `task_step`, or all tasks at once (`batch_tasks`);
        3. the meta-gradient ∂loss/∂θ (reptile: θ - θ') is averaged over the tasks (each task's
           graph is freed before the next is built), clipped to `max_grad_norm`, and θ takes one
           Adam step (`adam_update`, the same functional Adam as the inner loop).
        """
        cfg = self.cfg
        t0 = time.perf_counter()
        rng = self.rng(self.step_no)
        tasks = [self.tasks[rng.randrange(len(self.tasks))] for _ in range(cfg.tasks_per_step)]
        with training_mode(self.lm, cfg.order, cfg.bf16, cfg.batch_tasks), grad_checkpointing(self.lm, cfg.grad_checkpointing):
            if cfg.batch_tasks:
                meta_grad, results = self.batched_step(tasks, rng, track_before)
            else:
                theta = {k: p.detach().requires_grad_() for k, p in self.params.items()}
                total: Params = {k: torch.zeros_like(p) for k, p in theta.items()}
                results = []
                for task in tasks:
                    r = self.task_step(task, theta, rng, track_before)
                    for k, g in r.grads.items():
                        total[k] += g.float()
                    r.grads = {}
                    results.append(r)
                meta_grad = {k: g / len(tasks) for k, g in total.items()}
        gnorm = float(torch.stack([g.pow(2).sum() for g in meta_grad.values()]).sum().sqrt())  # one device sync
        if cfg.max_grad_norm and gnorm > cfg.max_grad_norm:
            meta_grad = {k: g * (cfg.max_grad_norm / gnorm) for k, g in meta_grad.items()}
        new, self.state = adam_update({k: p.detach() for k, p in self.params.items()}, meta_grad, self.state, cfg.lr_outer)
        self.params = {k: p.detach() for k, p in new.items()}
        self.state = self.state.detached()
        self.step_no += 1
        dt = time.perf_counter() - t0
        tokens = sum(r.tokens for r in results)

        def mean(xs):
            xs = [x for x in xs if x is not None]
            return sum(xs) / len(xs) if xs else None

        return {
            "step": self.step_no, "query_loss": mean([r.query_after for r in results]),
            "query_loss_before": mean([r.query_before for r in results]),
            "support_loss": mean([r.support_loss for r in results]), "grad_norm": gnorm,
            "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt if dt > 0 else None,
            "tasks": [getattr(t, "name", "?") for t in tasks],
        }

    # --- a fixed, held-out measure of what meta-training is for
    def held_out_loss(self, n_tasks: int = 4, adapt_steps: int | None = None, seed: int = 12345) -> dict[str, float]:
        """Mean query loss on held-out tasks, in context and after test-time adaptation (order 0),
        from θ; episodes fixed by `seed`, so values are comparable across steps and methods."""
        cfg, lm, fmt = self.cfg, self.lm, self.fmt
        tasks = (self.source.held_out or self.source.meta_train)[:n_tasks]
        steps = adapt_steps or max(cfg.inner_steps, 1)
        state = self.state if cfg.shared else None
        icl, adapted = [], []
        with training_mode(lm, None, cfg.bf16):
            for i, task in enumerate(tasks):
                rng = random.Random(f"heldout:{seed}:{i}")
                support, queries = fitting_episode(task, rng, cfg.support_size, cfg.query_size, fmt, self.max_row)
                d = Draw(support, *context_episodes(cfg, support, queries, steps, rng), 0, task.options, task.instruction)
                with torch.no_grad():
                    icl.append(self.query_loss(task, self.params, d).item())
                st = state.detached() if state is not None else AdamState()
                new, _ = self.adapt(task, dict(self.params), d, 0, st)
                with torch.no_grad():
                    adapted.append(self.query_loss(task, new, d).item())
        return {"icl": sum(icl) / len(icl), "adapted": sum(adapted) / len(adapted)}

