"""Meta-training: MAML-en-LLM (second order), first-order MAML, Reptile and MetaICL in one outer loop.

One outer step (`MetaTrainer.step`):
1. draw `tasks_per_step` meta-train tasks; from each, a support set (`support_size` examples)
   and disjoint query examples (`query_size`), all from the task's train split;
2. per task, the method's task loss at the current meta-parameters θ (the LoRA init on a
   frozen base, or the full weights):
   - maml:    θ' = inner_loop(θ, support episodes, order=2): `inner_steps` Adam steps on the
              support set (`support_batch` examples a step), with the graph kept through every
              step; loss = query loss at θ';
   - fomaml:  the same with order=1 (inner gradients are constants: dθ'/dθ = I);
   - reptile: (Nichol et al. 2018) the same inner loop at order 0 (no graph); the task's
              meta-gradient is θ - θ' itself, so the outer step moves θ toward the adapted
              weights. No query loss is differentiated (it is still computed at θ', no grad,
              for the metrics). Cheaper than fomaml by the query's forward-backward; with one
              inner step it is plain multi-task training on the support sets;
   - metaicl: no inner loop; loss = query loss at θ — MetaICL's multi-task in-context
              training on the very same episodes;
3. the meta-gradient ∂loss/∂θ (reptile: θ - θ') is averaged over the tasks (each task's graph
   is freed before the next is built), clipped to `max_grad_norm`, and θ takes one Adam step
   (`adam_update`, the same functional Adam as the inner loop).

Inner context (`inner_context`): what each support and query example sees.
   - "recipe" (the default for new runs): the test-time recipe (`model.recipe.DEFAULT`, as
     `model.adapt.adapt` runs it). The prediction prompt holds the whole support set; each
     support episode's examples are trained in it with their own copy masked from attention,
     with the recipe's loss and lr (`inner_lr` None); the query examples are scored in that
     same prompt, as held-out predictions will be (`episode_loss(..., prompt=support)`). The
     schedule stays the config's (`inner_steps` x `support_batch`), not the recipe's epochs:
     8 epochs of second-order steps would cost what a test-time adaptation does, per task.
   - "sampled": each example with `context_demos` support examples drawn at random in its
     context, LM loss (`icl_loss`): runs before the field existed, and a checkpoint without
     it resumes so (`resumed_config`). The vmapped path (`batch_tasks`) supports only this.
Either way the inner loop is `model.adapt.inner_loop` and the loss `model.adapt.episode_loss`:
test-time adaptation and meta-training run the same code.

Shared moments (`shared_moments`, default on for maml and fomaml; our reading of the
MAML-en-LLM recipe). There is ONE `AdamState` S (m, v, t). Each task's inner loop starts from
a detached copy of S — its first step is m ← β1·m_S + (1-β1)·g, with S's step count in the
bias correction — and the moments it accumulates on the support set are dropped when the
task is done (tasks of a batch never see each other's support gradients). Then the outer Adam
step updates S itself with the meta-gradient. So S only ever holds meta-gradient statistics,
and the inner loop preconditions its steps with them. The moments are constants for the
second-order gradient (they are not functions of θ). With the switch off, every inner loop
starts from empty moments (as test-time `adapt` does without a state) and S is the outer
optimiser's alone. Reptile never shares: its S holds moments of θ - θ', a displacement, not a
gradient. A checkpoint stores S either way; the evaluation hands it to test-time `adapt` only
for checkpoints trained with shared moments.

Why the switch matters for second order. From empty moments, Adam's first inner step is
u = g/(sqrt(g²+ε²)+ε) ≈ sign(g): its Jacobian is ≈ ε²/|g|³, negligible where |g| ≫ ε and 1/ε
where g = 0 exactly (LoRA's A while B = 0, embedding rows of tokens absent from the batch).
`adam_update` takes the almost-everywhere derivative (0) at exact zeros: before that, the very
first maml step's meta-gradient had norm 5e5 against 0.6 first-order (tiny model; 3e4 on
SmolLM2), and clipping turned it into a step in a direction set by ε. Near-zero gradients
still spike from empty moments: with separate moments, tiny-model maml steps reach |g| 10-20
where fomaml's stay below 1. With shared, populated moments the inner update is ≈ linear in g
(v_S dominates) and the second-order term is a real curvature term. `max_grad_norm` clipping
bounds what is left.

Batching tasks (`batch_tasks`). The step's tasks can also run as one batch: `torch.func.vmap`
over tasks of the same inner loop, with `torch.func.grad` for the inner and the meta-gradient
(`MetaTrainer.batched_step`); the same draws and meta-gradient as the task-by-task loop, for
every method, in the "sampled" inner context only. A 135M model's step is launch-bound on a
GPU, and this makes its kernels T times larger.

Practicalities. Second order needs attention with a double backward: the step runs under
`sdpa_kernel(SDPBackend.MATH)` (CPU SDPA's fused kernel has none). Gradient checkpointing
(`grad_checkpointing`) wraps each decoder layer in non-reentrant `torch.utils.checkpoint`
with the layer's *current* parameter tensors passed in explicitly: the model runs under
`functional_call`, and HF's own checkpointing would recompute with the module's original
weights (wrong gradients, silently). The result is bit-identical to no checkpointing, first
and second order (tests check it). What it saves (SmolLM2, CPU, peak RSS, 2k tokens a step):
fomaml/full 6.9 -> 5.3 GB, maml/lora 8.6 -> 7.5 GB, maml/full 15.7 -> 15.3 GB: little for second
order, whose create_graph backward keeps the recomputed activations alive anyway. On CUDA the meta-parameters are fp32 and the forward runs
under bf16 autocast. Each step's task and example draws come from `random.Random` seeded by
(seed, step) — no global RNG is read — so a run resumed from a checkpoint (params, Adam
state, step) continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from model import checkpoints
from model.bank.sampling import sample_episode as bank_sample_episode
from model.adapt import (
    AdamState, Episode, adam_update, episode_batch, episode_loss, inner_loop, sequences, support_episodes, target_loss,
)
from model.blobs import Blobs
from model.lm import LM, LoraSpec, Params
from model.meta_config import METHODS, ORDER, MetaTrainConfig  # noqa: F401  (METHODS, ORDER: re-exported)
from model.prompts import Formatter, longest
from model.recipe import DEFAULT
from model.task import Example

log = logging.getLogger("mamlserve.meta_train")

Progress = Callable[[int, int, dict[str, Any]], None]


# --------------------------------------------------------------------------- task sources
@dataclass
class SynthTask:
    """A task shaped like a bank task (name, options, instruction, train, test)."""

    name: str
    options: list[str]
    train: list[Example]
    test: list[Example]
    instruction: str | None = None
    kind: str = "classification"

    @property
    def is_classification(self) -> bool:
        return True

    def split(self, name: str) -> list[Example]:
        return {"train": self.train, "test": self.test, "dev": []}[name]


@dataclass
class TaskSource:
    setting: str
    meta_train: list[Any]  # bank tasks or SynthTask: .name .options .instruction .train .test
    held_out: list[Any]


_WORDS = ("movie great loved terrible boring quick brown fox jumps lazy dog paris berlin london tokyo "
          "madrid rome question answer input output film capital france true false yes no").split()
_LABELS = ("yes no true false positive negative sports politics business science world neutral "
           "entailment contradiction").split()


def synthetic_task(i: int, seed: int = 0, n_train: int = 64, n_test: int = 32) -> SynthTask:
    """A small classification task: two words in, a label out, the label a random function of the
    first word. Label names and the mapping differ per task, so a model gains on held-out
    tasks only by learning to read the mapping off the demonstrations (or to adapt fast)."""
    rng = random.Random(f"synthetic:{seed}:{i}")
    options = rng.sample(_LABELS, rng.choice((2, 3)))
    keys = rng.sample(_WORDS, 8)
    mapping = {w: options[j % len(options)] for j, w in enumerate(keys)}

    def example() -> Example:
        w = rng.choice(keys)
        return Example.model_construct(input=f"{w} {rng.choice(_WORDS)}", output=mapping[w], options=None)

    return SynthTask(f"synthetic-{seed}-{i}", options, [example() for _ in range(n_train)], [example() for _ in range(n_test)])


def synthetic_source(n_train: int = 24, n_held_out: int = 6, seed: int = 0) -> TaskSource:
    tasks = [synthetic_task(i, seed) for i in range(n_train + n_held_out)]
    return TaskSource("synthetic", tasks[:n_train], tasks[n_train:])


def task_source(setting: str, data_dir: Path | Blobs | None = None, settings_dir: Path | None = None) -> TaskSource:
    """The meta-train and held-out tasks of a setting: 'synthetic', or one of the task bank's
    (the bank under data_dir/bank, or under bank/ in a store)."""
    if setting == "synthetic":
        return synthetic_source()
    from model.bank.store import SETTINGS_DIR, load_bank

    bank = load_bank(data_dir, settings_dir or SETTINGS_DIR)
    s = bank.setting(setting)
    return TaskSource(setting, bank.tasks(list(s.meta_train)), bank.tasks(list(s.held_out)))


def is_classification(task: Any) -> bool:
    meta = getattr(task, "meta", None)
    if meta is not None and hasattr(meta, "is_classification"):
        return bool(meta.is_classification)
    return getattr(task, "options", None) is not None


# --------------------------------------------------------------------------- episodes
def _fits(fmt: Formatter, ex: Example, budget: int) -> bool:
    r = fmt.row(ex.input, ex.output)
    return len(r.ctx) + len(r.target) <= budget


def sample_episode(task: Any, rng: random.Random, n_support: int, n_query: int, fmt: Formatter,
                   max_row: int, tries: int = 8) -> tuple[list[Example], list[Example]]:
    """Disjoint support and query examples from a task's train split, drawn by the task bank's
    episode sampler (label-balanced support); examples whose row exceeds max_row tokens are
    dropped (the prompt budget could not hold them beside any demonstration)."""
    for _ in range(tries):
        support, queries = bank_sample_episode(task, n_support, n_query, rng)
        support = [e for e in support.demonstrations if _fits(fmt, e, max_row)]
        queries = [e for e in queries if _fits(fmt, e, max_row)]
        if len(support) >= 2 and queries:
            return support, queries
    raise ValueError(f"task {task.name!r}: no episode with 2 support and 1 query example within {max_row} tokens")


# Symbols of remapped episodes (symbol tuning, Wei et al. 2023): capital letters, or common words
# unrelated to any label. bench/adapt_quality.py's remapped variants draw from their own list.
_SYMBOL_WORDS = ("table orange silver ocean pepper ladder cotton saddle marble carpet tunnel bridge jacket copper "
                 "parrot meadow button garlic anchor velvet kettle harbor pillow walnut").split()


def remap_labels(support: list[Example], queries: list[Example], options: list[str],
                 rng: random.Random) -> tuple[list[Example], list[Example], list[str]]:
    """The episode with each option replaced by a random symbol (all letters or all words, a
    fresh mapping per episode), so the label names say nothing and the demonstrations everything."""
    pool = [chr(ord("A") + i) for i in range(26)] if rng.random() < 0.5 else list(_SYMBOL_WORDS)
    symbols = rng.sample(pool, len(options)) if len(options) <= len(pool) else list(options)
    to = dict(zip(options, symbols))

    def swap(xs: list[Example]) -> list[Example]:
        return [Example.model_construct(input=e.input, output=to.get(e.output, e.output), options=None) for e in xs]

    return swap(support), swap(queries), symbols


def query_episode(support: Sequence[Example], queries: Sequence[Example], context_demos: int, rng: random.Random) -> Episode:
    """Each query example with `context_demos` support examples in context: the evaluation's prompt shape."""
    return [(rng.sample(list(support), min(context_demos, len(support))), q) for q in queries]


def episode_tokens(fmt: Formatter, instruction: str | None, episode: Episode) -> int:
    seqs, _ = sequences(fmt, instruction, episode)
    return sum(len(s) for s in seqs)


def prompt_tokens(fmt: Formatter, instruction: str | None, prompt: Sequence[Example], episode: Episode) -> int:
    """Tokens through the model for an episode scored in a prediction prompt: the prompt once
    (a shared KV cache), then each query's gold row."""
    rows = [fmt.row(q.input, q.output) for _, q in episode]
    ids, _ = fmt.prefix(instruction, prompt, longest(rows))
    return len(ids) + sum(len(r.ctx) + len(r.target) for r in rows)


# --------------------------------------------------------------------------- model contexts
class _ReplayCache:
    """One layer's KV cache as it was before a checkpointed forward: `update` returns what the
    real cache's returned then (its keys and values, then the new ones) and stores nothing."""

    def __init__(self, kv: tuple[Tensor, Tensor] | None):
        self.kv = kv

    @classmethod
    def of(cls, cache: Any, idx: int | None) -> _ReplayCache:
        layers = getattr(cache, "layers", None)
        if idx is None or layers is None:
            raise NotImplementedError(f"gradient checkpointing over a {type(cache).__name__} cache")
        layer = layers[idx] if idx < len(layers) else None
        return cls((layer.keys, layer.values) if layer is not None and layer.is_initialized else None)

    def update(self, keys: Tensor, values: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.kv is None:
            return keys, values
        return torch.cat([self.kv[0], keys], dim=-2), torch.cat([self.kv[1], values], dim=-2)


@contextlib.contextmanager
def grad_checkpointing(lm: LM, enabled: bool = True) -> Iterator[None]:
    """Recompute each decoder layer in backward, with the tensors the forward actually used.

    Under `functional_call` a layer's `named_parameters()` are the override tensors, so they are
    captured at forward time and re-installed for the recomputation. Non-reentrant checkpointing
    supports `autograd.grad(create_graph=True)`: second order works through it. A KV cache (the
    prediction prompt of inner_context "recipe") is replayed to the recomputation as the forward
    found it (`_ReplayCache`).
    """
    if not enabled:
        yield
        return
    from torch.nn.utils.stateless import _reparametrize_module
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in lm.model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        orig = layer.forward

        def fwd(*args, _orig=orig, _layer=layer, **kwargs):
            if not torch.is_grad_enabled():
                return _orig(*args, **kwargs)
            names, tensors = zip(*_layer.named_parameters())
            # A KV cache (a prompt encoded once, or rows on top of one) is appended to by the
            # forward; the recomputation must see what the forward saw, not the cache after it.
            cache = kwargs.get("past_key_values")
            idx = getattr(getattr(_layer, "self_attn", None), "layer_idx", None)
            seen = _ReplayCache.of(cache, idx) if cache is not None else None
            calls = 0

            def run(*ts):
                nonlocal calls
                calls += 1
                kw = kwargs if calls == 1 or cache is None else {**kwargs, "past_key_values": seen}
                with _reparametrize_module(_layer, dict(zip(names, ts))):
                    return _orig(*args, **kw)

            return checkpoint(run, *tensors, use_reentrant=False)

        layer.forward = fwd
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward


@contextlib.contextmanager
def training_mode(lm: LM, order: int | None, bf16: bool, batched: bool = False) -> Iterator[None]:
    """No KV cache, MATH attention for second order (the fused kernels have no double backward)
    and for vmapped tasks (they have no batching rule: vmap would loop over tasks), bf16
    autocast on CUDA."""
    cfg = lm.model.config
    old_cache = getattr(cfg, "use_cache", None)
    cfg.use_cache = False  # training forwards never reuse keys/values; don't build a cache
    with contextlib.ExitStack() as stack:
        if order == 2 or batched:
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if bf16 and lm.device.type == "cuda":
            stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        try:
            yield
        finally:
            cfg.use_cache = old_cache


# --------------------------------------------------------------------------- the outer loop
def initial_params(lm: LM, space: str, seed: int) -> Params:
    """θ₀: a fresh LoRA init (B=0: the model starts unchanged) or a copy of the base weights, fp32."""
    src = lm.lora_init(seed) if space == "lora" else lm.params("full")
    return {k: v.detach().clone().float() for k, v in src.items()}


def _ordered(tensors: Params, names: Sequence[str]) -> Params:
    """tensors with the keys in `names` first, in that order (any others after, as they came)."""
    known = set(names)
    return {k: tensors[k] for k in names if k in tensors} | {k: v for k, v in tensors.items() if k not in known}


@dataclass
class Draw:
    """One task's examples for a step: the support set, the query episode, one support episode
    per inner step (none for MetaICL) and the tokens they put through the model; the options and
    instruction they are scored with (the task's, or none and the symbols of a remapped episode)."""

    support: list[Example]
    query: Episode
    episodes: list[Episode]
    tokens: int
    options: list[str] | None = None
    instruction: str | None = None


@dataclass
class TaskResult:
    grads: Params
    query_after: float
    query_before: float | None
    support_loss: float | None
    tokens: int


@dataclass
class MetaTrainer:
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
        fit = sum(_fits(self.fmt, e, self.max_row) for e in head)
        return fit >= 8 and fit * 2 >= len(head)

    def rng(self, step: int) -> random.Random:
        return random.Random(f"meta:{self.cfg.seed}:{step}")  # a str seed is hashed with sha512: stable across runs

    def episodes(self, support: list[Example], queries: list[Example], steps: int,
                 rng: random.Random) -> tuple[Episode, list[Episode]]:
        """The query episode and `steps` support episodes of `support_batch` examples each, in the
        run's inner context."""
        cfg = self.cfg
        if cfg.inner_context == "sampled":
            q_ep = query_episode(support, queries, cfg.context_demos, rng)
            return q_ep, support_episodes(support, steps, cfg.support_batch, cfg.context_demos, rng)
        # "recipe": the prediction prompt holds the whole support set, so no example gets a context of its own
        return [([], q) for q in queries], support_episodes(support, steps, cfg.support_batch, 0, rng)

    def draw(self, task: Any, rng: random.Random) -> Draw:
        cfg, fmt = self.cfg, self.fmt
        support, queries = sample_episode(task, rng, cfg.support_size, cfg.query_size, fmt, self.max_row)
        options, instruction = task.options, task.instruction
        # the coin is drawn only when remapping is on: runs without it keep their exact draws
        if cfg.remap and options and rng.random() < cfg.remap:
            # the instruction goes too: it may name the original labels
            support, queries, options = remap_labels(support, queries, options, rng)
            instruction = None
        q_ep, episodes = self.episodes(support, queries, 0 if cfg.order is None else cfg.inner_steps, rng)
        if cfg.inner_context == "sampled":
            tokens = sum(episode_tokens(fmt, instruction, ep) for ep in [q_ep, *episodes])
        else:
            tokens = sum(prompt_tokens(fmt, instruction, support, ep) for ep in [q_ep, *episodes])
        return Draw(support, q_ep, episodes, tokens, options, instruction)

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
        return self.state.detached() if self.cfg.shared else AdamState(betas=self.state.betas, eps=self.state.eps)

    def task_step(self, task: Any, theta: Params, rng: random.Random, track_before: bool) -> TaskResult:
        """One task's contribution to the meta-gradient (its graph is freed on return)."""
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

    def step(self, track_before: bool = False) -> dict[str, Any]:
        """One outer step; returns its metrics."""
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

    def batched_step(self, tasks: list, rng: random.Random, track_before: bool) -> tuple[Params, list[TaskResult]]:
        """The step's tasks as one batch: `torch.func.vmap` over tasks of the same inner loop
        (functional Adam, inner gradients by `torch.func.grad`), and `torch.func.grad` of the mean
        query loss for the meta-gradient. Same draws and the same meta-gradient as the task-by-task
        loop (to float rounding), in T-times larger kernels: what a latency-bound GPU step needs.
        Reptile vmaps the inner loops alone (its meta-gradient is θ - θ'). Episodes are
        right-padded to one shape and run without an attention mask (`target_loss`)."""
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

        def one(theta: Params, sup_batches: list[tuple[Tensor, Tensor]], ids: Tensor, labels: Tensor):
            p, st, first = theta, state, torch.zeros(())
            for i, (s_ids, s_labels) in enumerate(sup_batches):
                g, value = grad_and_value(loss)(p, s_ids, s_labels)
                if cfg.order < 2:
                    g = {k: x.detach() for k, x in g.items()}
                p, st = adam_update(p, g, st, cfg.lr_inner)
                first = value.detach() if i == 0 else first
            return loss(p, ids, labels), first, p

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
                support, queries = sample_episode(task, rng, cfg.support_size, cfg.query_size, fmt, self.max_row)
                d = Draw(support, *self.episodes(support, queries, steps, rng), 0, task.options, task.instruction)
                with torch.no_grad():
                    icl.append(self.query_loss(task, self.params, d).item())
                st = state.detached() if state is not None else AdamState()
                new, _ = self.adapt(task, dict(self.params), d, 0, st)
                with torch.no_grad():
                    adapted.append(self.query_loss(task, new, d).item())
        return {"icl": sum(icl) / len(icl), "adapted": sum(adapted) / len(adapted)}


# --------------------------------------------------------------------------- entry point
def setting_fingerprint(source: TaskSource) -> str:
    """sha256 of the setting's two task lists: the committed settings files can be regenerated."""
    text = json.dumps([sorted(t.name for t in source.meta_train), sorted(t.name for t in source.held_out)])
    return hashlib.sha256(text.encode()).hexdigest()


def _meta(cfg: MetaTrainConfig, lm: LM, source: TaskSource, status: str, step: int, parent: str | None,
          history: list) -> dict[str, Any]:
    return {
        "method": cfg.method, "space": cfg.space, "setting": cfg.setting, "status": status,
        # what this checkpoint has seen: the evaluation refuses held-out tasks that are in here
        "meta_train_tasks": sorted(t.name for t in source.meta_train), "setting_sha256": setting_fingerprint(source),
        "step": step, "total_steps": cfg.steps, "parent": parent, "shared_moments": cfg.shared,
        "order": cfg.order, "seed": cfg.seed,
        "hyperparameters": {
            "tasks_per_step": cfg.tasks_per_step, "inner_steps": cfg.inner_steps, "inner_lr": cfg.lr_inner,
            "outer_lr": cfg.lr_outer, "support_size": cfg.support_size, "support_batch": cfg.support_batch,
            "query_size": cfg.query_size, "context_demos": cfg.context_demos, "inner_context": cfg.inner_context,
            "remap": cfg.remap, "max_grad_norm": cfg.max_grad_norm,
            "betas": list(cfg.betas), "context_tokens": cfg.context_tokens, "grad_checkpointing": cfg.grad_checkpointing,
            "prompt_format": cfg.prompt_format,
        },
        "base_model": {"name": lm.name, "sha256": lm.sha256},
        "lora": {"r": lm.lora.r, "alpha": lm.lora.alpha, "targets": list(lm.lora.targets),
                 "layers": checkpoints.lora_layers(lm.lora.layers, lm.n_layers)},
        "config": cfg.model_dump(mode="json"),
        "history": history[-200:],
    }


def resumed_config(cfg: MetaTrainConfig, meta: dict[str, Any]) -> MetaTrainConfig:
    """The config a run resumed from a checkpoint continues with: the checkpoint's inner context
    unless the caller names one, and then it must be the same (a resume continues the run it
    resumes). A meta.json written before `inner_context` existed ran "sampled"."""
    stored = (meta.get("config") or {}).get("inner_context", "sampled")
    if "inner_context" in cfg.model_fields_set:
        if cfg.inner_context != stored:
            raise ValueError(f"checkpoint {cfg.resume} was meta-trained with inner_context {stored!r}, "
                             f"not {cfg.inner_context!r}")
        return cfg
    return MetaTrainConfig.model_validate({**cfg.model_dump(exclude_unset=True), "inner_context": stored})


def load_for_training(cfg: MetaTrainConfig) -> LM:
    from model.loading import load_lm

    lm = load_lm(cfg.base_model, cfg.dir, cfg.device, LoraSpec.of(cfg), attn="sdpa")
    if lm.device.type == "cuda":
        lm.model.float()  # fp32 master weights; the forward runs under bf16 autocast
    return lm


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
    lm = lm or load_for_training(cfg)
    source = source or task_source(cfg.setting, None if cfg.setting == "synthetic" else cfg.dir)
    reg = registry if registry is not None else cfg.dir
    params, state, step, parent, history = None, None, 0, None, []
    if cfg.resume:
        params, state, meta = checkpoints.load(reg, cfg.resume, lm.device)
        checkpoints.check_compatible(meta, lm)
        cfg = resumed_config(cfg, meta)
        if (meta["method"], meta["space"]) != (cfg.method, cfg.space):
            raise ValueError(f"checkpoint {cfg.resume} is {meta['method']}/{meta['space']}, not {cfg.method}/{cfg.space}")
        params = {k: v.float() for k, v in params.items()}
        step, parent, history = int(meta["step"]), cfg.resume, list(meta.get("history", []))
    trainer = MetaTrainer(cfg, lm, source, params or {}, state or AdamState(betas=tuple(cfg.betas)), step)
    ckpt_id = checkpoints.new_id(reg, cfg.method, cfg.space, cfg.setting)
    log.info("meta-training %s: %s/%s on %s (%d meta-train tasks), steps %d..%d, model %s",
             ckpt_id, cfg.method, cfg.space, cfg.setting, len(source.meta_train), step, cfg.steps, lm.name)

    def save(status: str) -> None:
        checkpoints.save(reg, ckpt_id, trainer.params, trainer.state,
                         _meta(cfg, lm, source, status, trainer.step_no, parent, history))

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


# --------------------------------------------------------------------------- CLI
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


if __name__ == "__main__":
    import typer

    typer.run(main)
