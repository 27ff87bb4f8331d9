"""Meta-training: MAML-en-LLM (second order), first-order MAML and MetaICL in one outer loop.

One outer step (`MetaTrainer.step`):
1. draw `tasks_per_step` meta-train tasks; from each, a support set (`support_size` examples)
   and disjoint query examples (`query_size`), all from the task's train split;
2. per task, the method's task loss at the current meta-parameters θ (the LoRA init on a
   frozen base, or the full weights):
   - maml:    θ' = inner_loop(θ, support episodes, order=2): `inner_steps` Adam steps on the
              support set's in-context loss (each support example the query, others in
              context: `model.adapt.support_episodes`), with the graph kept through every step;
              loss = icl_loss(θ', query episode);
   - fomaml:  the same with order=1 (inner gradients are constants: dθ'/dθ = I);
   - metaicl: no inner loop; loss = icl_loss(θ, query episode) — MetaICL's multi-task
              in-context training on the very same episodes;
   the query episode puts `context_demos` support examples in context of each query example,
   which is also how the held-out evaluation prompts (k demonstrations in context);
3. the meta-gradient ∂loss/∂θ is averaged over the tasks (each task's graph is freed before
   the next is built), clipped to `max_grad_norm`, and θ takes one Adam step (`adam_update`,
   the same functional Adam as the inner loop).
The inner loop is `model.adapt.inner_loop` and the loss `model.adapt.icl_loss`: test-time
adaptation and meta-training run the same code.

Shared moments (`shared_moments`, default on for maml and fomaml; our reading of the
MAML-en-LLM recipe). There is ONE `AdamState` S (m, v, t). Each task's inner loop starts from
a detached copy of S — its first step is m ← β1·m_S + (1-β1)·g, with S's step count in the
bias correction — and the moments it accumulates on the support set are dropped when the
task is done (tasks of a batch never see each other's support gradients). Then the outer Adam
step updates S itself with the meta-gradient. So S only ever holds meta-gradient statistics,
and the inner loop preconditions its steps with them. The moments are constants for the
second-order gradient (they are not functions of θ). With the switch off, every inner loop
starts from empty moments (as test-time `adapt` does without a state) and S is the outer
optimiser's alone. A checkpoint stores S either way; the evaluation hands it to test-time
`adapt` only for checkpoints trained with shared moments.

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
(`MetaTrainer.batched_step`); the same draws and meta-gradient as the task-by-task loop. A
135M model's step is launch-bound on a GPU, and this makes its kernels T times larger.

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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from model import checkpoints
from model.bank.sampling import sample_episode as bank_sample_episode
from model.adapt import (
    AdamState, Episode, adam_update, episode_batch, icl_loss, inner_loop, sequences, support_episodes, target_loss,
)
from model.blobs import Blobs
from model.lm import LM, LoraSpec, Params
from model.prompts import Formatter
from model.recipe import LR
from model.settings import get_settings
from model.task import Example

log = logging.getLogger("mamlserve.meta_train")

METHODS = ("maml", "fomaml", "metaicl")
ORDER = {"maml": 2, "fomaml": 1, "metaicl": None}
Progress = Callable[[int, int, dict[str, Any]], None]


class MetaTrainConfig(BaseModel):
    """Everything a meta-training run depends on; stored whole in the checkpoint's meta.json."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["maml", "fomaml", "metaicl"] = "maml"
    space: Literal["lora", "full"] = "lora"
    setting: str = Field("class_to_class", description="a task-bank setting, or 'synthetic' (built in code)")
    base_model: str | None = Field(None, description="model spec; None: the settings' base_model")
    steps: int = Field(100, ge=0, description="outer steps in total (a resumed run counts the parent's)")
    tasks_per_step: int = Field(4, ge=1)
    inner_steps: int = Field(1, ge=1, description="inner Adam steps per task (maml, fomaml)")
    inner_lr: float | None = Field(None, gt=0, description="None: the recipe's default lr for the space (model.recipe.LR)")
    outer_lr: float | None = Field(None, gt=0, description="None: 3e-4 (lora) / 1e-5 (full)")
    support_size: int = Field(8, ge=2, description="support examples drawn per task")
    support_batch: int = Field(4, ge=1, description="support queries per inner step")
    query_size: int = Field(4, ge=1, description="query examples per task")
    context_demos: int = Field(4, ge=0, description="demonstrations in context of each support/query example")
    shared_moments: bool | None = Field(None, description="one Adam state for inner and outer; None: on for maml/fomaml")
    max_grad_norm: float | None = Field(1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    prompt_format: str | None = None
    context_tokens: int = Field(256, ge=32, description="prompt budget of every training sequence")
    grad_checkpointing: bool = False
    batch_tasks: bool = Field(False, description="run a step's tasks as one vmapped batch (not with grad_checkpointing)")
    bf16: bool = Field(True, description="bf16 autocast on CUDA (params stay fp32); ignored on CPU")
    seed: int = 0
    log_every: int = Field(10, ge=1)
    save_every: int = Field(0, ge=0, description="also checkpoint every N steps (0: only at the end or on stop)")
    resume: str | None = Field(None, description="checkpoint id to continue from")
    device: str | None = None
    data_dir: Path | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    lora_targets: list[str] | None = None
    tag: str | None = Field(None, description="free text stored in meta.json")

    @model_validator(mode="after")
    def _batching(self) -> MetaTrainConfig:
        if self.batch_tasks and self.grad_checkpointing:
            raise ValueError("batch_tasks and grad_checkpointing cannot be combined (the checkpointing wrapper "
                             "re-installs parameters per layer, which torch.func.vmap does not see)")
        return self

    # --- resolved values (defaults that depend on the method, space or settings)
    @property
    def order(self) -> int | None:
        return ORDER[self.method]

    @property
    def shared(self) -> bool:
        if self.order is None:
            return False
        return True if self.shared_moments is None else self.shared_moments

    @property
    def lr_inner(self) -> float:
        return self.inner_lr if self.inner_lr is not None else LR[self.space]

    @property
    def lr_outer(self) -> float:
        if self.outer_lr is not None:
            return self.outer_lr
        return 3e-4 if self.space == "lora" else 1e-5

    @property
    def dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir is not None else get_settings().data_dir

    def lora_spec(self) -> LoraSpec:
        s = get_settings()
        own = LoraSpec.of(s)
        return LoraSpec(self.lora_r or own.r, self.lora_alpha or own.alpha, tuple(self.lora_targets or own.targets), own.layers)

    def formatter(self, lm: LM) -> Formatter:
        return Formatter(lm.encode, self.prompt_format or get_settings().prompt_format, self.context_tokens)


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


def query_episode(support: Sequence[Example], queries: Sequence[Example], context_demos: int, rng: random.Random) -> Episode:
    """Each query example with `context_demos` support examples in context: the evaluation's prompt shape."""
    return [(rng.sample(list(support), min(context_demos, len(support))), q) for q in queries]


def episode_tokens(fmt: Formatter, instruction: str | None, episode: Episode) -> int:
    seqs, _ = sequences(fmt, instruction, episode)
    return sum(len(s) for s in seqs)


# --------------------------------------------------------------------------- model contexts
@contextlib.contextmanager
def grad_checkpointing(lm: LM, enabled: bool = True) -> Iterator[None]:
    """Recompute each decoder layer in backward, with the tensors the forward actually used.

    Under `functional_call` a layer's `named_parameters()` are the override tensors, so they are
    captured at forward time and re-installed for the recomputation. Non-reentrant checkpointing
    supports `autograd.grad(create_graph=True)`: second order works through it.
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
            kwargs["past_key_values"] = None  # a cache would be appended to twice (forward + recompute)
            names, tensors = zip(*_layer.named_parameters())

            def run(*ts):
                with _reparametrize_module(_layer, dict(zip(names, ts))):
                    return _orig(*args, **kwargs)

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

    def draw(self, task: Any, rng: random.Random) -> tuple[Episode, list[Episode], int]:
        """A task's query episode, its support episodes (one per inner step; none for MetaICL) and
        their token count."""
        cfg, fmt = self.cfg, self.fmt
        support, queries = sample_episode(task, rng, cfg.support_size, cfg.query_size, fmt, self.max_row)
        q_ep = query_episode(support, queries, cfg.context_demos, rng)
        episodes = [] if cfg.order is None else support_episodes(support, cfg.inner_steps, cfg.support_batch,
                                                                 cfg.context_demos, rng)
        tokens = sum(episode_tokens(fmt, task.instruction, ep) for ep in [q_ep, *episodes])
        return q_ep, episodes, tokens

    def inner_state(self) -> AdamState:
        return self.state.detached() if self.cfg.shared else AdamState(betas=self.state.betas, eps=self.state.eps)

    def task_step(self, task: Any, theta: Params, rng: random.Random, track_before: bool) -> TaskResult:
        """One task's contribution to the meta-gradient (its graph is freed on return)."""
        cfg, lm, fmt = self.cfg, self.lm, self.fmt
        q_ep, episodes, tokens = self.draw(task, rng)
        instr = task.instruction
        before = support_loss = None
        if cfg.order is None:  # MetaICL: in-context loss at θ itself
            loss = icl_loss(lm, theta, fmt, instr, q_ep)
        else:
            inner_state = self.inner_state()
            if track_before:
                with torch.no_grad():
                    before = icl_loss(lm, theta, fmt, instr, q_ep).item()
            adapted, _, losses = inner_loop(lm, {}, dict(theta), fmt, instr, episodes, cfg.lr_inner, inner_state, cfg.order)
            support_loss = losses[0]
            loss = icl_loss(lm, adapted, fmt, instr, q_ep)
        grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
        g = {k: (x.detach() if x is not None else torch.zeros_like(p)) for (k, p), x in zip(theta.items(), grads)}
        after = loss.item()
        return TaskResult(g, after, after if cfg.order is None else before, support_loss, tokens)

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
        Episodes are right-padded to one shape and run without an attention mask (`target_loss`)."""
        from torch.func import grad, grad_and_value, vmap

        cfg, lm, fmt = self.cfg, self.lm, self.fmt
        drawn = [self.draw(t, rng) for t in tasks]

        def stacked(eps: list[Episode]) -> tuple[Tensor, Tensor]:
            rows = max(len(e) for e in eps)
            length = max(len(x) for t, e in zip(tasks, eps) for x in sequences(fmt, t.instruction, e)[0])
            batches = [episode_batch(lm, fmt, t.instruction, e, rows, length) for t, e in zip(tasks, eps)]
            return torch.stack([b[0] for b in batches]), torch.stack([b[2] for b in batches])

        q_ids, q_labels = stacked([d[0] for d in drawn])
        sup = [stacked([d[1][i] for d in drawn]) for i in range(len(drawn[0][1]))]
        state = self.inner_state() if cfg.order is not None else None

        def loss(p: Params, ids: Tensor, labels: Tensor) -> Tensor:
            return target_loss(lm, p, ids, labels)

        def one(theta: Params, sup_batches: list[tuple[Tensor, Tensor]], ids: Tensor, labels: Tensor):
            p, st, first = theta, state, torch.zeros(())
            for i, (s_ids, s_labels) in enumerate(sup_batches):
                g, value = grad_and_value(loss)(p, s_ids, s_labels)
                if cfg.order == 1:
                    g = {k: x.detach() for k, x in g.items()}
                p, st = adam_update(p, g, st, cfg.lr_inner)
                first = value.detach() if i == 0 else first
            return loss(p, ids, labels), first

        def mean_query_loss(theta: Params):
            q, first = vmap(one, in_dims=(None, 0, 0, 0))(theta, sup, q_ids, q_labels)
            return q.mean(), (q.detach(), first)

        theta = {k: p.detach() for k, p in self.params.items()}
        with torch.no_grad():  # grad() still differentiates; the module's own parameters build no graph
            meta_grad, (after, first) = grad(mean_query_loss, has_aux=True)(theta)
        before = [None] * len(tasks)
        if track_before and cfg.order is not None:
            with torch.no_grad():
                before = vmap(loss, in_dims=(None, 0, 0))(theta, q_ids, q_labels).tolist()
        after, first = after.tolist(), first.tolist()
        results = [TaskResult({}, a, a if cfg.order is None else b, None if cfg.order is None else f, d[2])
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
                q_ep = query_episode(support, queries, cfg.context_demos, rng)
                eps = support_episodes(support, steps, cfg.support_batch, cfg.context_demos, rng)
                with torch.no_grad():
                    icl.append(icl_loss(lm, self.params, fmt, task.instruction, q_ep).item())
                st = state.detached() if state is not None else None
                new, _, _ = inner_loop(lm, {}, dict(self.params), fmt, task.instruction, eps, cfg.lr_inner, st, 0)
                with torch.no_grad():
                    adapted.append(icl_loss(lm, new, fmt, task.instruction, q_ep).item())
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
            "query_size": cfg.query_size, "context_demos": cfg.context_demos, "max_grad_norm": cfg.max_grad_norm,
            "betas": list(cfg.betas), "context_tokens": cfg.context_tokens, "grad_checkpointing": cfg.grad_checkpointing,
            "prompt_format": cfg.prompt_format or get_settings().prompt_format,
        },
        "base_model": {"name": lm.name, "sha256": lm.sha256},
        "lora": {"r": lm.lora.r, "alpha": lm.lora.alpha, "targets": list(lm.lora.targets)},
        "config": cfg.model_dump(mode="json"),
        "history": history[-200:],
    }


def load_for_training(cfg: MetaTrainConfig) -> LM:
    from model.loading import load_lm

    s = get_settings()
    lm = load_lm(cfg.base_model or s.base_model, cfg.dir, cfg.device or s.device, cfg.lora_spec(), attn="sdpa")
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
    source = source or task_source(cfg.setting, cfg.data_dir)
    reg = registry if registry is not None else cfg.dir
    params, state, step, parent, history = None, None, 0, None, []
    if cfg.resume:
        params, state, meta = checkpoints.load(reg, cfg.resume, lm.device)
        checkpoints.check_compatible(meta, lm)
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
    """Meta-train and print the checkpoint id (python -m model.meta_train --setting S --method maml --space lora)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = MetaTrainConfig(
        method=method, space=space, setting=setting, base_model=model, steps=steps, tasks_per_step=tasks_per_step,
        inner_steps=inner_steps, inner_lr=inner_lr, outer_lr=outer_lr, support_size=support_size,
        support_batch=support_batch, query_size=query_size, context_demos=context_demos,
        shared_moments=shared_moments, context_tokens=context_tokens, grad_checkpointing=grad_checkpointing,
        batch_tasks=batch_tasks, seed=seed, log_every=log_every, save_every=save_every, resume=resume, device=device, data_dir=data_dir,
    )
    print(meta_train(cfg))


if __name__ == "__main__":
    import typer

    typer.run(main)
