"""What each method computes for one task at the meta-parameters θ: its loss after the inner loop
(maml, fomaml), the displacement θ - θ' (reptile) or its in-context loss at θ (metaicl)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from model.adapt import inner_loop
from model.losses import episode_loss
from model.optim import AdamState
from model.lm import LM, Params
from model.meta.episodes import Draw, draw
from model.meta_config import MetaTrainConfig
from model.prompts import Formatter
from model.recipe import DEFAULT


@dataclass
class TaskResult:
    grads: Params
    query_after: float
    query_before: float | None
    support_loss: float | None
    tokens: int


class TaskMethod:
    """The per-task half of `MetaTrainer` (model/meta/outer.py), which provides these attributes."""

    cfg: MetaTrainConfig
    lm: LM
    fmt: Formatter
    max_row: int  # tokens an example's row may take: half the context, the other half for demonstrations
    state: AdamState  # the outer optimiser's Adam moments

    def draw(self, task: Any, rng: random.Random) -> Draw:
        return draw(self.cfg, self.fmt, self.max_row, task, rng)

    def recipe_args(self, d: Draw) -> dict[str, Any]:
        """`episode_loss` / `inner_loop` keywords of the inner context. "recipe": what test-time
        `adapt` passes (`model.adapt.prompt_of`): the recipe's loss in the prediction prompt, the
        support set being the demonstrations. "sampled": none, i.e. the LM loss (`icl_loss`) with
        each example's own sampled context."""
        if self.cfg.inner_context == "sampled":
            return {}
        return dict(options=d.options, loss=DEFAULT.loss, length_norm=DEFAULT.length_norm, prompt=d.support,
                    prompt_grad=DEFAULT.prompt_grad)

    def query_loss(self, task: Any, params: Params, d: Draw) -> Tensor:
        """The query episode's loss under `params`: what the meta-gradient differentiates (and
        what is reported). In the prediction prompt the gradient also flows through the prompt's
        keys and values (prompt_grad): the recipe holds them constant at test time to save a
        backward pass, but how demonstrations are encoded is part of what meta-training learns."""
        return episode_loss(self.lm, params, self.fmt, d.instruction, d.query,
                            **{**self.recipe_args(d), "prompt_grad": True})

    def adapt(self, task: Any, theta: Params, d: Draw, order: int,
              state: AdamState | None = None) -> tuple[Params, list[float]]:
        """θ' = the inner loop from θ on the draw's support episodes: `model.adapt.inner_loop`,
        the very function test-time adaptation runs, with the same keywords in "recipe" context."""
        state = state if state is not None else self.inner_state()
        adapted, _, losses = inner_loop(self.lm, {}, dict(theta), self.fmt, d.instruction, d.episodes,
                                        self.cfg.lr_inner, state, order, **self.recipe_args(d))
        return adapted, losses

    def inner_state(self) -> AdamState:
        """The Adam moments a task's inner loop starts from.

        Shared moments (`shared_moments`, default on for maml and fomaml; our reading of the
        MAML-en-LLM recipe). There is ONE `AdamState` S (m, v, t). Each task's inner loop starts
        from a detached copy of S (its first step is m <- b1*m_S + (1-b1)*g, with S's step count
        in the bias correction) and the moments it accumulates on the support set are dropped
        when the task is done (tasks of a batch never see each other's support gradients). Then
        the outer Adam step updates S itself with the meta-gradient. So S only ever holds
        meta-gradient statistics, and the inner loop preconditions its steps with them. The
        moments are constants for the second-order gradient (they are not functions of θ). With
        the switch off, every inner loop starts from empty moments (as test-time `adapt` does
        without a state) and S is the outer optimiser's alone. Reptile never shares: its S holds
        moments of θ - θ', a displacement, not a gradient. A checkpoint stores S either way; the
        evaluation hands it to test-time `adapt` only for checkpoints trained with shared moments.

        Why the switch matters for second order. From empty moments, Adam's first inner step is
        u = g/(sqrt(g²+ε²)+ε) ≈ sign(g): its Jacobian is ≈ ε²/|g|³, negligible where |g| ≫ ε and
        1/ε where g = 0 exactly (LoRA's A while B = 0, embedding rows of tokens absent from the
        batch). `adam_update` takes the almost-everywhere derivative (0) at exact zeros: before
        that, the very first maml step's meta-gradient had norm 5e5 against 0.6 first-order (tiny
        model; 3e4 on SmolLM2), and clipping turned it into a step in a direction set by ε.
        Near-zero gradients still spike from empty moments: with separate moments, tiny-model
        maml steps reach |g| 10-20 where fomaml's stay below 1. With shared, populated moments
        the inner update is ≈ linear in g (v_S dominates) and the second-order term is a real
        curvature term. `max_grad_norm` clipping bounds what is left.
        """
        return self.state.detached() if self.cfg.shared else AdamState(betas=self.state.betas, eps=self.state.eps)

    def task_step(self, task: Any, theta: Params, rng: random.Random, track_before: bool) -> TaskResult:
        """One task's contribution to the meta-gradient (its graph is freed on return): a support
        set and disjoint query examples drawn from the task's train split (`draw`), then

        - maml:    θ' = inner_loop(θ, support episodes, order=2): `inner_steps` Adam steps on the
                   support set (`support_batch` examples a step), with the graph kept through
                   every step; loss = query loss at θ';
        - fomaml:  the same with order=1 (inner gradients are constants: dθ'/dθ = I);
        - reptile: (Nichol et al. 2018) the same inner loop at order 0 (no graph); the task's
                   meta-gradient is θ - θ' itself, so the outer step moves θ toward the adapted
                   weights. No query loss is differentiated (it is still computed at θ', no
                   grad, for the metrics). Cheaper than fomaml by the query's forward-backward;
                   with one inner step it is plain multi-task training on the support sets;
        - metaicl: no inner loop; loss = query loss at θ: MetaICL's multi-task in-context
                   training on the very same episodes;

        and the meta-gradient ∂loss/∂θ (reptile: θ - θ'). Either way the inner loop is
        `model.adapt.inner_loop` and the loss `model.losses.episode_loss`: test-time adaptation and
        meta-training run the same code.
        """
        cfg = self.cfg
        d = self.draw(task, rng)
        before = support_loss = None
        if cfg.order is None:  # MetaICL: in-context loss at θ itself
            loss = self.query_loss(task, theta, d)
        else:
            if track_before:
                with torch.no_grad():
                    before = self.query_loss(task, theta, d).item()
            adapted, losses = self.adapt(task, theta, d, cfg.order)
            support_loss = losses[0]
            if cfg.method == "reptile":
                # Reptile: the task's meta-gradient is θ - θ' (the outer step moves θ toward the
                # adapted weights); no query loss is differentiated, it is only reported. Its scale
                # (~ inner lr x inner steps) is not a gradient's, but the outer Adam normalises
                # the step by the pseudo-gradient's own running moments, so the outer lr is the
                # step size either way.
                with torch.no_grad():
                    after = self.query_loss(task, adapted, d).item()
                g = {k: (p - adapted[k]).detach() for k, p in theta.items()}
                return TaskResult(g, after, before, support_loss, d.tokens)
            loss = self.query_loss(task, adapted, d)
        grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
        g = {k: (x.detach() if x is not None else torch.zeros_like(p)) for (k, p), x in zip(theta.items(), grads)}
        after = loss.item()
        return TaskResult(g, after, after if cfg.order is None else before, support_loss, d.tokens)
