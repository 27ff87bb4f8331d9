"""Fast adaptation: `adapt`, test-time adaptation to a task's demonstrations, and `inner_loop`, the
inner loop it shares with meta-training (order 0 at test time; 1 first-order, 2 second-order),
over the episodes `support_episodes` draws; the update is `model.optim`'s, the loss `model.losses`'."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from model.calibration import demo_scores, option_prior
from model.lm import LM, Params
from model.losses import Episode, episode_loss, recipe_loss
from model.optim import AdamState, adam_steps
from model.prefix import Lower, in_context
from model.prompts import Formatter
from model.recipe import DEFAULT, Recipe
from model.retrieval import task_embeddings
from model.task import Example, Task



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
    stop: Callable[[], bool] | None = None,
) -> tuple[Params, AdamState, list[float]]:
    """Adapt `trainable` (on top of `fixed` overrides) with one Adam step per episode of `loss`
    (`episode_loss`): `adam_steps` with gradients by `torch.autograd.grad`.

    order 0: test time (each step starts from detached leaves); 1: first-order; 2: second-order.
    `stop`, asked after each step, ends the loop there.
    """

    def gradient(params: Params, ep: Episode) -> tuple[Params, Tensor]:
        if order == 0:  # this step's own leaves
            params = {k: p.detach().requires_grad_() for k, p in params.items()}
        value = episode_loss(lm, {**fixed, **params}, fmt, instruction, ep, options, loss, length_norm, prompt, prompt_grad,
                             lower)
        grads = torch.autograd.grad(value, list(params.values()), create_graph=order == 2, allow_unused=True)
        return {k: (g if g is not None else torch.zeros_like(p)) for (k, p), g in zip(params.items(), grads)}, value

    report = (lambda i, n, value: on_step(i, n, value.item())) if on_step else None
    trainable, state, values = adam_steps(gradient, trainable, episodes, lr, state or AdamState(), order, report, stop)
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
    epochs: float = 0.0  # the passes the steps taken made
    steps: int = 0  # Adam steps taken
    planned: int = 0  # Adam steps the recipe planned (more than taken when stopped)
    stopped: str | None = None  # why it stopped early: "time_budget" or "stopped"; None: every planned step ran
    embeddings: Tensor | None = None  # the demonstrations' (model.retrieval.embed), where predictions retrieve

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
    time_budget_s: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Adapted:
    """Adapt to a task's demonstrations in `mode` ("lora" or "full") as the recipe says: its
    loss, `recipe.steps_for(n)` Adam steps at `recipe.lr_for(mode)`, then (when it calibrates)
    the options' prior under the adapted weights.

    `start` holds parameter overrides to begin from (a meta-trained checkpoint's LoRA init or
    full weights); `state` its Adam moments, when it shares them.

    `time_budget_s` (seconds from the call) ends the inner loop after the step under way once it
    is spent, and `should_stop` (asked after each step) whenever it says so; the result says
    which, and the steps taken of those planned. Calibration then runs on what was trained: its
    cost is bounded apart (`model.calibration.CALIBRATION_DEMOS`), and where it retrieves (a
    prefix per demonstration) by the budget too: training stops at four fifths of it. Where predictions will retrieve
    their demonstrations (`Recipe.retrieve`), their embeddings are computed here, once.
    """
    t0 = time.monotonic()
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
    embeddings = task_embeddings(lm, fmt, task, recipe)
    free = free and embeddings is None  # retrieval scores demonstrations in other contexts than training's
    why: list[str] = []

    # Under retrieval calibration encodes a prefix per demonstration scored: it gets the budget's
    # last fifth (and scores at least MIN_CALIBRATION_DEMOS), training the rest.
    deadline = None if time_budget_s is None else t0 + time_budget_s
    train_s = None if time_budget_s is None else time_budget_s * (0.8 if embeddings is not None else 1.0)

    def stop() -> bool:
        if should_stop is not None and should_stop():
            why.append("stopped")
        elif train_s is not None and time.monotonic() - t0 >= train_s:
            why.append("time_budget")
        return bool(why)

    trainable, state, losses = inner_loop(lm, fixed, trainable, fmt, task.instruction, episodes, recipe.lr_for(mode),
                                          state, 0, on_step, task.options, recipe.loss, recipe.length_norm,
                                          prompt, recipe.prompt_grad, lower, stop)
    done = len(losses)
    stopped = why[0] if why and done < steps else None
    params = {**fixed, **trainable}
    scored = demo_scores(lm, task, params, recipe, fmt, embeddings) if free else None
    first = [q for _, q in episodes[0]] if episodes else list(demos)
    after = recipe_loss(scored, first, recipe) if scored else None
    if after is None:  # not training in the prompt, or demonstrations with their own options
        before = support_loss(lm, init, fmt, task, recipe, seed)
        after = support_loss(lm, params, fmt, task, recipe, seed) if steps else before
    else:
        before = losses[0] if losses else after
    prior = (scored.prior(recipe.length_norm) if scored
             else option_prior(lm, task, params, recipe, fmt, embeddings, deadline)) if recipe.calibrate else None
    epochs = recipe.epochs_for(len(demos)) * (done / steps if steps else 0.0)
    return Adapted(mode, trainable, before, after, losses, state, prior, epochs, done, steps, stopped, embeddings)
