"""Adam written functionally: its moments (`AdamState`), one step (`adam_update`), and the inner loop
(`adam_steps`), which test-time adaptation and meta-training both run; meta-training may share the
moments with its outer optimizer (the MAML-en-LLM recipe) or keep them apart."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from model.lm import Params


@dataclass
class AdamState:
    """Adam's moments for one parameter space; `t` counts the steps taken with them."""

    m: Params = field(default_factory=dict)
    v: Params = field(default_factory=dict)
    t: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def detached(self) -> AdamState:
        return AdamState({k: x.detach() for k, x in self.m.items()}, {k: x.detach() for k, x in self.v.items()},
                         self.t, self.betas, self.eps)


def adam_update(params: Params, grads: Mapping[str, Tensor], state: AdamState, lr: float) -> tuple[Params, AdamState]:
    """One Adam step as a pure function of its inputs (differentiable when grads carry a graph)."""
    b1, b2 = state.betas
    t = state.t + 1
    m, v, new = {}, {}, {}
    for k, p in params.items():
        # Second order: where g is exactly 0 (LoRA's A while B is still 0) the step's derivative
        # is that of g/sqrt(g^2 + eps^2) at 0, i.e. 1/eps, a spike that swamped the first
        # meta-gradient (norm 5e5 vs 0.6 first-order on the tiny model). The sign-like step has
        # derivative 0 almost everywhere: take that one. (Same values; done always, because
        # under torch.func transforms `requires_grad` does not tell whether g is tracked.)
        g = torch.where(grads[k] == 0, grads[k].detach(), grads[k])
        m[k] = b1 * state.m[k] + (1 - b1) * g if k in state.m else (1 - b1) * g
        v[k] = b2 * state.v[k] + (1 - b2) * g * g if k in state.v else (1 - b2) * g * g
        m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
        # eps inside the root keeps its derivative finite where v is 0 (LoRA's A at B=0)
        new[k] = p - lr * m_hat / ((v_hat + state.eps**2).sqrt() + state.eps)
    return new, AdamState(m, v, t, state.betas, state.eps)


Gradient = Callable[[Params, Any], tuple[Params, Tensor]]  # (params, batch) -> (d loss / d params, loss)


def adam_steps(gradient: Gradient, params: Params, batches: Sequence[Any], lr: float, state: AdamState, order: int,
               on_step: Callable[[int, int, Tensor], None] | None = None,
               stop: Callable[[], bool] | None = None) -> tuple[Params, AdamState, list[Tensor]]:
    """The inner loop itself: one Adam step per batch down `gradient`'s loss; returns the params,
    the moments and each step's loss (detached tensors).

    order 0: each step starts from detached params, no graph kept; 1: the gradients are constants
    (first order); 2: the graph runs through every step. It never syncs with the host nor marks a
    tensor for autograd, so one loop serves both: `inner_loop` hands it `torch.autograd.grad`, and
    meta-training's batched step (`model.meta.batching`) `torch.func.grad_and_value` under `vmap`.
    `stop`, asked after each step, ends the loop there (a time budget, a cancelled task): the
    losses returned then say how many steps were taken.
    """
    losses = []
    for batch in batches:
        if order == 0:
            params = {k: p.detach() for k, p in params.items()}
        grads, value = gradient(params, batch)
        if order < 2:
            grads = {k: g.detach() for k, g in grads.items()}
        params, state = adam_update(params, grads, state, lr)
        losses.append(value.detach())
        if on_step:
            on_step(len(losses), len(batches), losses[-1])
        if stop is not None and stop():
            break
    return params, state, losses
