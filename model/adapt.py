"""Fast adaptation: the inner loop shared by test-time adaptation and meta-training.

The loss is the in-context loss over a task's demonstrations: each demonstration becomes the
query with a few others as its context, and only its output tokens are scored. Parameters
live in dicts applied with `functional_call`, so the very same `inner_loop` runs

- at test time (order=0): plain steps, no graph kept;
- in FOMAML (order=1): the adapted parameters stay a function of the initial ones, but the
  inner gradients are treated as constants;
- in MAML-en-LLM (order=2): `create_graph=True`, the meta-gradient flows through every inner step.

The update is Adam written functionally; its moments live in an `AdamState` that meta-training
may share with the outer optimizer (the MAML-en-LLM recipe) or keep apart.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from model.calibration import DemoScores, demo_scores, demo_spans, option_prior
from model.lm import LM, Params
from model.prefix import Lower, encode_prefix, in_context, pad, row_keys, row_logprobs
from model.prompts import Formatter, Row, longest
from model.recipe import DEFAULT, Recipe
from model.task import Example, Task

Episode = list[tuple[list[Example], Example]]  # (context demonstrations, query) pairs: one batch


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


def sequences(fmt: Formatter, instruction: str | None, episode: Episode) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Token ids of each (context, query) pair and the [start, end) span of its target."""
    seqs, spans = [], []
    for ctx_demos, query in episode:
        row = fmt.row(query.input, query.output)
        prefix, _ = fmt.prefix(instruction, ctx_demos, len(row.ctx) + len(row.target))
        ids = prefix + row.ctx + row.target
        seqs.append(ids)
        spans.append((len(ids) - len(row.target), len(ids)))
    return seqs, spans


def episode_batch(lm: LM, fmt: Formatter, instruction: str | None, episode: Episode, rows: int = 0,
                  length: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, mask, labels) of an episode, right-padded to at least `rows` x `length` (extra rows are
    all padding with no target: they add nothing to the loss). Labels are -100 off the targets."""
    seqs, spans = sequences(fmt, instruction, episode)
    seqs = seqs + [[]] * max(0, rows - len(seqs))
    ids, mask = pad([s or [lm.eos_id] for s in seqs], lm.eos_id, lm.device)
    if ids.shape[1] < length:
        ids = F.pad(ids, (0, length - ids.shape[1]), value=lm.eos_id)
        mask = F.pad(mask, (0, length - mask.shape[1]))
    labels = torch.full_like(ids, -100)
    for i, (a, b) in enumerate(spans):
        labels[i, a:b] = ids[i, a:b]
    return ids, mask, labels


def target_loss(lm: LM, params: Mapping[str, Tensor] | None, ids: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean cross-entropy over the labelled tokens. With right padding, mask None gives the same
    loss (a causal model's real tokens never see the padding after them) and no data-dependent
    mask code, which torch.func.vmap cannot run."""
    logits = lm(params, input_ids=ids, attention_mask=mask).logits
    return F.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(), labels[..., 1:].flatten(), ignore_index=-100)


def icl_loss(lm: LM, params: Mapping[str, Tensor] | None, fmt: Formatter, instruction: str | None, episode: Episode) -> Tensor:
    """Mean cross-entropy over the target tokens of every query in the episode (MetaICL's loss)."""
    ids, mask, labels = episode_batch(lm, fmt, instruction, episode)
    return target_loss(lm, params, ids, labels, mask)


def option_loss(lm: LM, params: Mapping[str, Tensor] | None, fmt: Formatter, instruction: str | None,
                episode: Episode, options: Sequence[str] | None, length_norm: bool = True, lm_weight: float = 0.0,
                prompt: Sequence[Example] | None = None, gold_only: bool = False, prompt_grad: bool = True,
                lower: Lower | None = None) -> Tensor:
    """Cross-entropy over each query's option scores (the scores prediction ranks by), plus
    `lm_weight` times the LM loss on the gold option's tokens (`gold_only`: that loss alone).
    Queries without options (generation) contribute the LM loss alone.

    Context: each query's own sampled demonstrations (the episode's), or with `prompt` the
    prediction prompt itself (instruction + those demonstrations, in order, as many as fit),
    encoded once for the whole batch, each query's own copy masked from its attention: training
    then sees exactly the context predictions will see, and no query can copy its label.
    `prompt_grad` False treats the prompt's keys and values as constants (a backward pass less);
    `lower` runs the frozen layers below the LoRA once across steps (see `model.prefix.Lower`)."""
    queries = [q for _, q in episode]
    cands = [fmt.candidates(q.input, [q.output] if gold_only else list(q.options or options or [q.output])) for q in queries]
    ids, used, where = [], 0, {}
    if prompt is not None:
        ids, used = fmt.prefix(instruction, prompt, max(longest(c) for c in cands))
        where = demo_spans(fmt, prompt, ids, used)
    rows: list[Row] = []
    hide: list[tuple[int, int] | None] = []
    spans: list[tuple[int, int, int]] = []  # per query: its rows [a, b) and the gold row
    for (ctx_demos, q), cs in zip(episode, cands):
        opts = [q.output] if gold_only else list(q.options or options or [q.output])
        spans.append((len(rows), len(rows) + len(cs), len(rows) + opts.index(q.output)))
        if prompt is None:
            head, _ = fmt.prefix(instruction, ctx_demos, longest(cs))
            cs = [Row(head + r.ctx, r.target) for r in cs]
        rows += cs
        hide += [where.get(id(q))] * len(cs)
    if lower is not None and not ids:
        lower = None  # it replays on top of a cached prompt only
    if lower is not None:
        lower.covers(row_keys(ids, rows, hide))
    with torch.set_grad_enabled(torch.is_grad_enabled() and prompt_grad):
        prefix = encode_prefix(lm, ids, params, used, lower)
    sums, lengths = row_logprobs(lm, prefix, rows, params, hide=hide, lower=lower)
    return scored_loss(sums, lengths, spans, length_norm, lm_weight)


def scored_loss(sums: Tensor, lengths: Tensor, spans: Sequence[tuple[int, int, int]], length_norm: bool = True,
                lm_weight: float = 0.0, lm_only: bool = False) -> Tensor:
    """The loss from scored rows: per query, its rows [a, b) and gold row g (`spans`); the mean
    cross-entropy over each query's option scores plus `lm_weight` times the LM loss on the gold
    rows' tokens, or (`lm_only`, or no query with two options) that LM loss alone."""
    gold = torch.tensor([g for _, _, g in spans], device=sums.device)
    lm_term = -sums[gold].sum() / lengths[gold].sum()
    scores = sums / lengths if length_norm else sums
    ce = [] if lm_only else [-(scores[g] - torch.logsumexp(scores[a:b], 0)) for a, b, g in spans if b - a > 1]
    if not ce:
        return lm_term
    return torch.stack(ce).mean() + lm_weight * lm_term


def recipe_loss(scored: DemoScores, queries: Sequence[Example], recipe: Recipe) -> float | None:
    """The recipe's loss on these demonstrations from their leave-one-out scores in the
    prediction prompt (None when one of them was not scored there)."""
    rows = {id(d): i for i, d in enumerate(scored.demos)}
    if not queries or any(id(q) not in rows for q in queries):
        return None
    n = len(scored.options)
    spans = [(rows[id(q)] * n, rows[id(q)] * n + n, rows[id(q)] * n + scored.options.index(q.output)) for q in queries]
    return scored_loss(scored.sums.flatten(), scored.lengths.flatten(), spans, recipe.length_norm,
                       1.0 if recipe.loss == "mix" else 0.0, recipe.loss == "lm").item()


def episode_loss(lm: LM, params: Mapping[str, Tensor] | None, fmt: Formatter, instruction: str | None,
                 episode: Episode, options: Sequence[str] | None = None, loss: str = "lm", length_norm: bool = True,
                 prompt: Sequence[Example] | None = None, prompt_grad: bool = True, lower: Lower | None = None) -> Tensor:
    """The recipe's training loss on one episode: "lm", "options" or "mix", each query in its
    own sampled context or (`prompt`) in the prediction prompt (see `option_loss`)."""
    if loss == "lm":
        if prompt is None:
            return icl_loss(lm, params, fmt, instruction, episode)
        return option_loss(lm, params, fmt, instruction, episode, options, length_norm, prompt=prompt, gold_only=True,
                           prompt_grad=prompt_grad, lower=lower)
    return option_loss(lm, params, fmt, instruction, episode, options, length_norm, 1.0 if loss == "mix" else 0.0, prompt,
                       prompt_grad=prompt_grad, lower=lower)


def support_episodes(demos: Sequence[Example], steps: int, batch_size: int, context_demos: int, rng: random.Random) -> list[Episode]:
    """Per step, `batch_size` demonstrations as queries (cycling so each is used), each with up to
    `context_demos` of the others, drawn at random, as its context."""
    order: list[int] = []
    episodes = []
    for _ in range(steps):
        batch = []
        for _ in range(min(batch_size, len(demos))):
            if not order:
                order = rng.sample(range(len(demos)), len(demos))
            i = order.pop()
            others = [d for j, d in enumerate(demos) if j != i]
            batch.append((rng.sample(others, min(context_demos, len(others))), demos[i]))
        episodes.append(batch)
    return episodes


Gradient = Callable[[Params, Any], tuple[Params, Tensor]]  # (params, batch) -> (d loss / d params, loss)


def adam_steps(gradient: Gradient, params: Params, batches: Sequence[Any], lr: float, state: AdamState, order: int,
               on_step: Callable[[int, int, Tensor], None] | None = None) -> tuple[Params, AdamState, list[Tensor]]:
    """The inner loop itself: one Adam step per batch down `gradient`'s loss; returns the params,
    the moments and each step's loss (detached tensors).

    order 0: each step starts from detached params, no graph kept; 1: the gradients are constants
    (first order); 2: the graph runs through every step. It never syncs with the host nor marks a
    tensor for autograd, so one loop serves both: `inner_loop` hands it `torch.autograd.grad`, and
    meta-training's batched step (`model.meta.batching`) `torch.func.grad_and_value` under `vmap`.
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
    return params, state, losses


def inner_loop(
    lm: LM,
    fixed: Mapping[str, Tensor],
    trainable: Params,
    fmt: Formatter,
    instruction: str | None,
    episodes: Sequence[Episode],
    lr: float,
    state: AdamState | None = None,
    order: int = 0,
    on_step: Callable[[int, int, float], None] | None = None,
    options: Sequence[str] | None = None,
    loss: str = "lm",
    length_norm: bool = True,
    prompt: Sequence[Example] | None = None,
    prompt_grad: bool = True,
    lower: Lower | None = None,
) -> tuple[Params, AdamState, list[float]]:
    """Adapt `trainable` (on top of `fixed` overrides) with one Adam step per episode of `loss`
    (`episode_loss`): `adam_steps` with gradients by `torch.autograd.grad`.

    order 0: test time (each step starts from detached leaves); 1: first-order; 2: second-order.
    """

    def gradient(params: Params, ep: Episode) -> tuple[Params, Tensor]:
        if order == 0:  # this step's own leaves
            params = {k: p.detach().requires_grad_() for k, p in params.items()}
        value = episode_loss(lm, {**fixed, **params}, fmt, instruction, ep, options, loss, length_norm, prompt, prompt_grad,
                             lower)
        grads = torch.autograd.grad(value, list(params.values()), create_graph=order == 2, allow_unused=True)
        return {k: (g if g is not None else torch.zeros_like(p)) for (k, p), g in zip(params.items(), grads)}, value

    report = (lambda i, n, value: on_step(i, n, value.item())) if on_step else None
    trainable, state, values = adam_steps(gradient, trainable, episodes, lr, state or AdamState(), order, report)
    if order == 0:
        trainable = {k: p.detach() for k, p in trainable.items()}
        state = state.detached()
    return trainable, state, [v.item() for v in values]


@dataclass
class Adapted:
    mode: str  # lora | full
    params: Params  # lora: the adapted LoRA weights; full: the adapted full weights
    loss_before: float
    loss_after: float
    losses: list[float]
    state: AdamState
    prior: dict[str, float] | None = None  # option -> log prior to subtract when predicting (Recipe.calibrate)
    epochs: float = 0.0

    def delta(self, start: Mapping[str, Tensor]) -> Params:
        """Full mode: adapted minus starting weights (what is stored)."""
        return {k: (p - start[k]).contiguous() for k, p in self.params.items()}


def start_params(lm: LM, mode: str, start: Mapping[str, Tensor] | None = None, seed: int = 0) -> tuple[Params, Params]:
    """(fixed, trainable) for a mode: trainable is taken from `start` (a checkpoint) where it has it.

    Trainable parameters are fp32 masters even on a bf16 model (autocast casts them for compute).
    """
    start = dict(start or {})
    names = lm.lora_names if mode == "lora" else lm.full_names
    if mode == "lora":
        init = lm.lora_init(seed)
        trainable = {n: start.get(n, init[n]) for n in names}
    elif mode == "full":
        own = lm.params("full")
        trainable = {n: start.get(n, own[n]) for n in names}
    else:
        raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
    fixed = {k: v for k, v in start.items() if k not in trainable}
    return fixed, {k: v.float() for k, v in trainable.items()}


@torch.no_grad()
def support_loss(lm: LM, params: Mapping[str, Tensor], fmt: Formatter, task: Task, recipe: Recipe, seed: int, n: int = 8) -> float:
    """The recipe's loss on a fixed set of up to n leave-one-out queries (for before/after reports)."""
    rng = random.Random(seed + 1)
    (episode,) = support_episodes(task.demonstrations, 1, n, recipe.context_demos or 0, rng)
    return episode_loss(lm, params, fmt, task.instruction, episode, task.options, recipe.loss, recipe.length_norm,
                        prompt_of(task, recipe), recipe.prompt_grad).item()


def frozen_below(lm: LM, mode: str) -> Lower | None:
    """A `Lower` for the layers under the lowest LoRA layer, when LoRA (the only thing trained)
    leaves some frozen at the bottom."""
    if mode != "lora" or lm.lora.layers is None:
        return None
    start = min(i % lm.n_layers for i in lm.lora.layers)
    return Lower(start) if start > 0 else None


def prompt_of(task: Task, recipe: Recipe) -> list[Example] | None:
    """The demonstrations of the prediction prompt, when the recipe trains in it (context_demos None)."""
    return in_context(task, recipe).demonstrations if recipe.context_demos is None else None


def adapt(
    lm: LM,
    task: Task,
    recipe: Recipe = DEFAULT,
    mode: str = "lora",
    start: Mapping[str, Tensor] | None = None,
    state: AdamState | None = None,
    seed: int = 0,
    fmt: Formatter | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> Adapted:
    """Adapt to a task's demonstrations in `mode` ("lora" or "full") as the recipe says: its
    loss, `recipe.steps_for(n)` Adam steps at `recipe.lr_for(mode)`, then (when it calibrates)
    the options' prior under the adapted weights.

    `start` holds parameter overrides to begin from (a meta-trained checkpoint's LoRA init or
    full weights); `state` its Adam moments, when it shares them.
    """
    fmt = fmt or Formatter(lm.encode)
    fixed, trainable = start_params(lm, mode, start, seed)
    demos = task.demonstrations
    steps = recipe.steps_for(len(demos))
    episodes = support_episodes(demos, steps, recipe.batch_size, recipe.context_demos or 0, random.Random(seed))
    prompt = prompt_of(task, recipe)
    # Training in the prediction prompt, the loss before is the first step's own and the loss
    # after comes from the demonstrations' scores that calibration computes anyway (the same
    # queries in the prediction prompt): two passes (`support_loss`) fewer per adaptation.
    free = prompt is not None and task.options is not None and (recipe.calibrate or steps > 0)
    init = {**fixed, **trainable}
    lower = frozen_below(lm, mode) if prompt is not None else None
    trainable, state, losses = inner_loop(lm, fixed, trainable, fmt, task.instruction, episodes, recipe.lr_for(mode),
                                          state, 0, on_step, task.options, recipe.loss, recipe.length_norm,
                                          prompt, recipe.prompt_grad, lower)
    params = {**fixed, **trainable}
    scored = demo_scores(lm, task, params, recipe, fmt) if free else None
    first = [q for _, q in episodes[0]] if episodes else list(demos)
    after = recipe_loss(scored, first, recipe) if scored else None
    if after is None:  # not training in the prompt, or demonstrations with their own options
        before = support_loss(lm, init, fmt, task, recipe, seed)
        after = support_loss(lm, params, fmt, task, recipe, seed) if steps else before
    else:
        before = losses[0] if losses else after
    prior = (scored.prior(recipe.length_norm) if scored else option_prior(lm, task, params, recipe, fmt)) \
        if recipe.calibrate else None
    return Adapted(mode, trainable, before, after, losses, state, prior, recipe.epochs_for(len(demos)))
