"""A step's tasks as one batch: `torch.func.vmap` over tasks of the inner loop every task runs
(`model.optim.adam_steps`), for T-times larger kernels on a GPU (`batch_tasks`)."""

from __future__ import annotations

import random

import torch
from torch import Tensor

from model.losses import Episode, episode_batch, sequences, target_loss
from model.optim import adam_steps
from model.lm import Params
from model.meta.method import TaskMethod, TaskResult


class BatchedTasks(TaskMethod):
    """`batched_step` for `MetaTrainer`: the same draws and meta-gradient as its task-by-task loop."""

    params: Params

    def batched_step(self, tasks: list, rng: random.Random, track_before: bool) -> tuple[Params, list[TaskResult]]:
        """The step's tasks as one batch: `torch.func.vmap` over tasks of the same inner loop as
        `task_step` (`adam_steps`, with inner gradients by `torch.func.grad_and_value`), and
        `torch.func.grad` of the mean query loss for the meta-gradient. Same draws and the same
        meta-gradient as the task-by-task loop (to float rounding), for every method, in the
        "sampled" inner context only, in T-times larger kernels: a 135M model's step is
        launch-bound on a GPU. Reptile vmaps the inner loops alone (its meta-gradient is θ - θ').
        Episodes are right-padded to one shape and run without an attention mask (`target_loss`)."""
        from torch.func import grad, grad_and_value, vmap

        cfg, lm, fmt = self.cfg, self.lm, self.fmt
        if cfg.inner_context != "sampled":
            raise ValueError("batched_step needs inner_context 'sampled' (see MetaTrainConfig)")
        drawn = [self.draw(t, rng) for t in tasks]

        def stacked(eps: list[Episode]) -> tuple[Tensor, Tensor]:
            rows = max(len(e) for e in eps)
            length = max(len(x) for d, e in zip(drawn, eps) for x in sequences(fmt, d.instruction, e)[0])
            batches = [episode_batch(lm, fmt, d.instruction, e, rows, length) for d, e in zip(drawn, eps)]
            return torch.stack([b[0] for b in batches]), torch.stack([b[2] for b in batches])

        q_ids, q_labels = stacked([d.query for d in drawn])
        sup = [stacked([d.episodes[i] for d in drawn]) for i in range(len(drawn[0].episodes))]
        state = self.inner_state() if cfg.order is not None else None

        def loss(p: Params, ids: Tensor, labels: Tensor) -> Tensor:
            return target_loss(lm, p, ids, labels)

        def gradient(p: Params, batch: tuple[Tensor, Tensor]) -> tuple[Params, Tensor]:
            return grad_and_value(loss)(p, *batch)

        def one(theta: Params, sup_batches: list[tuple[Tensor, Tensor]], ids: Tensor, labels: Tensor):
            """One task: its inner loop, then its query loss at θ' (and its first support loss)."""
            p, _, losses = adam_steps(gradient, theta, sup_batches, cfg.lr_inner, state, cfg.order)
            return loss(p, ids, labels), losses[0] if losses else torch.zeros(()), p

        def mean_query_loss(theta: Params):
            q, first, _ = vmap(one, in_dims=(None, 0, 0, 0))(theta, sup, q_ids, q_labels)
            return q.mean(), (q.detach(), first)

        theta = {k: p.detach() for k, p in self.params.items()}
        with torch.no_grad():  # grad() still differentiates; the module's own parameters build no graph
            if cfg.method == "reptile":  # the mean of θ - θ' over tasks (see task_step); nothing to differentiate
                after, first, adapted = vmap(one, in_dims=(None, 0, 0, 0))(theta, sup, q_ids, q_labels)
                meta_grad = {k: (p - adapted[k]).sum(0) / len(tasks) for k, p in theta.items()}
            else:
                meta_grad, (after, first) = grad(mean_query_loss, has_aux=True)(theta)
        before = [None] * len(tasks)
        if track_before and cfg.order is not None:
            with torch.no_grad():
                before = vmap(loss, in_dims=(None, 0, 0))(theta, q_ids, q_labels).tolist()
        after, first = after.tolist(), first.tolist()
        results = [TaskResult({}, a, a if cfg.order is None else b, None if cfg.order is None else f, d.tokens)
                   for a, b, f, d in zip(after, before, first, drawn)]
        return {k: g.float() for k, g in meta_grad.items()}, results
