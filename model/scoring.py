"""Option scoring and greedy generation, with a task's demonstration prefix encoded once.

An option's score is its mean per-token log-likelihood given the prompt (MetaICL: the lowest
loss wins), or the sum with `length_norm=False`. All options of all queries go through the
model as one batch (chunked), on top of the prefix's KV cache expanded to the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from model.lm import LM
from model.prompts import Formatter, Row, longest
from model.recipe import ICL, Recipe
from model.task import Example, Query, Task


@dataclass
class Prefix:
    """A task's encoded prompt prefix: its token ids and, when cached, each layer's keys and values."""

    ids: list[int]
    kv: list[tuple[Tensor, Tensor]] | None = None
    n_demos: int = 0

    def cache(self, batch: int) -> DynamicCache | None:
        if not self.kv:
            return None
        return DynamicCache([(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.kv])


@dataclass
class Prediction:
    output: str
    scores: dict[str, float] | None = None  # option -> score (higher is better); None for generation


def pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Right-pad to a batch; the mask marks real tokens (pad may equal eos, so never infer it from ids)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def encode_prefix(lm: LM, ids: list[int], params: Mapping[str, Tensor] | None = None, n_demos: int = 0,
                  lower: Lower | None = None) -> Prefix:
    """The prompt prefix's KV cache (differentiable when grad is on: training through the prompt).
    With `lower` the frozen layers run once (see `Lower`)."""
    if not ids:
        return Prefix(ids, None, n_demos)
    x = torch.tensor([ids], device=lm.device)
    out = _forward(lm, params, lower, [("p", tuple(ids))], x, [(0, len(ids))],
                   attention_mask=torch.ones_like(x), use_cache=True, logits_to_keep=1)
    kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    return Prefix(ids, kv, n_demos)


class Lower:
    """What the frozen layers below `start` make of each prompt and row, computed once.

    A LoRA that sits only on layers >= start (and nothing else trained) leaves every hidden
    state entering layer `start` unchanged from one adaptation step to the next. The first
    step that meets a prompt or a row runs the whole model and records that hidden state (the
    "record" pass: exact, its gradients too); once a step's prompt and rows are all recorded it
    runs only the layers above, from the recorded states (the "replay" pass), while the layers
    below pass their input through and keep the KV cache's length with placeholder keys.
    """

    def __init__(self, start: int):
        self.start = start
        self.h: dict[tuple, Tensor] = {}
        self.replay = False  # the mode of the current step; set by `covers`

    def covers(self, keys: Sequence[tuple]) -> bool:
        """Whether every key is recorded; sets the step's mode (replay when it is)."""
        self.replay = all(k in self.h for k in keys)
        return self.replay

    @contextlib.contextmanager
    def skipping(self, lm: LM):
        layers = [m for m in lm.model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]
        for layer in layers[: self.start]:
            idx = layer.self_attn.layer_idx

            def passthrough(hidden_states, *args, past_key_values=None, _idx=idx, **kwargs):
                if past_key_values is not None:  # keep the cache's length with one-wide placeholders:
                    b, n = hidden_states.shape[:2]  # transformers reads a cache with no elements as empty
                    dummy = hidden_states.new_zeros((b, 1, n, 1))
                    past_key_values.update(dummy, dummy, _idx)
                return hidden_states

            layer.forward = passthrough
        try:
            yield
        finally:
            for layer in layers[: self.start]:
                del layer.forward


def row_keys(prefix_ids: Sequence[int], rows: Sequence[Row], hide: Sequence[tuple[int, int] | None] | None = None) -> list[tuple]:
    """The `Lower` keys that scoring these rows on this prefix needs (as `row_logprobs` groups them)."""
    hide = hide or [None] * len(rows)
    p = tuple(prefix_ids)
    groups: dict[tuple, list[list[int]]] = {}
    for r, h in zip(rows, hide):
        groups.setdefault((tuple(r.ctx), h), []).append(r.target)
    keys = [("p", p)] if p else []
    return keys + [("c", p, ctx, h, tuple(_trie(targets)[0])) for (ctx, h), targets in groups.items()]


def _forward(lm: LM, params: Mapping[str, Tensor] | None, lower: Lower | None, keys: Sequence[tuple], ids: Tensor,
             spans: Sequence[tuple[int, int]], **kwargs):
    """lm(params, input_ids=ids, **kwargs); with `lower`, the record or replay pass (see `Lower`).
    Row j's real tokens are its columns spans[j] = [a, b)."""
    if lower is None:
        return lm(params, input_ids=ids, **kwargs)
    if not lower.replay:
        out = lm(params, input_ids=ids, output_hidden_states=True, **kwargs)
        h = out.hidden_states[lower.start].detach()
        for j, (key, (a, b)) in enumerate(zip(keys, spans)):
            lower.h[key] = h[j, a:b]
        return out
    first = lower.h[keys[0]]
    h = first.new_zeros((ids.shape[0], ids.shape[1], first.shape[-1]))
    for j, (key, (a, b)) in enumerate(zip(keys, spans)):
        h[j, a:b] = lower.h[key]
    with lower.skipping(lm):
        return lm(params, inputs_embeds=h, **kwargs)


def _trie(targets: Sequence[Sequence[int]]) -> tuple[list[tuple[int, ...]], dict[tuple[int, ...], int]]:
    """The distinct proper prefixes of the targets (each a node standing for its last token),
    parents before children; a target's last token is predicted but never read."""
    nodes: dict[tuple[int, ...], int] = {}
    for t in targets:
        for d in range(1, len(t)):
            nodes.setdefault(tuple(t[:d]), len(nodes))
    order = sorted(nodes, key=len)
    return order, {n: i for i, n in enumerate(order)}


def _mask4d(lm: LM, allowed: Tensor) -> Tensor:
    """A custom 4D mask as the attention implementation takes it: SDPA a boolean (True attends),
    eager an additive float mask."""
    if lm.model.config._attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=lm.dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(lm.dtype).min)
    return allowed


def row_logprobs(
    lm: LM, prefix: Prefix, rows: Sequence[Row], params: Mapping[str, Tensor] | None = None, chunk: int = 32,
    hide: Sequence[tuple[int, int] | None] | None = None, lower: Lower | None = None,
) -> tuple[Tensor, Tensor]:
    """(sum of target log-probs, target length) per row, as tensors; differentiable when grad is on.

    Rows that share their ctx (a query and its options, in the direct format) are one sequence
    on top of the prefix's KV cache: the ctx once, then the options' tokens packed as a trie
    (options with a common beginning share it), each token attending to the ctx and to its own
    option's earlier tokens only, at the positions it would have alone. Every option's first
    token comes from the ctx's last position, so a single-token option set (letters, yes/no,
    most one-word labels) costs the ctx alone. Ctxs are left-padded and tries right-padded, so
    the logits needed are the last columns of every row. Without a cached prefix, the prefix
    ids lead each ctx. `hide[i]`, a [start, end) span of prefix positions, is masked from row
    i's attention (a demonstration scored without seeing its own copy in context). `lower`
    runs the frozen layers once across training steps (see `Lower`; it needs a cached prefix).
    """
    dev = lm.device
    hide = hide or [None] * len(rows)
    groups: dict[tuple, list[int]] = {}
    for i, (r, h) in enumerate(zip(rows, hide)):
        groups.setdefault((tuple(r.ctx), h), []).append(i)
    lead = [] if prefix.kv is not None else list(prefix.ids)
    past = len(prefix.ids) if prefix.kv is not None else 0
    p = tuple(prefix.ids)
    sums: list[Tensor] = [torch.zeros((), device=dev)] * len(rows)
    items = list(groups.items())
    for c0 in range(0, len(items), chunk):
        part = items[c0: c0 + chunk]
        ctxs = [lead + list(c) for (c, _), _ in part]
        tries = [_trie([rows[i].target for i in members]) for _, members in part]
        width, k = max(len(c) for c in ctxs), max(len(t[0]) for t in tries)
        n, q = len(part), width + k
        ids = torch.full((n, q), lm.eos_id, dtype=torch.long)
        pos = torch.zeros((n, q), dtype=torch.long)
        mask = torch.zeros((n, q, past + q), dtype=torch.bool)
        spans = []
        for j, (((_, h), _), c, (nodes, _)) in enumerate(zip(part, ctxs, tries)):
            a = width - len(c)
            ids[j, a:width] = torch.tensor(c)
            pos[j, a:width] = past + torch.arange(len(c))
            mask[j, :, :past] = True
            if h is not None:
                mask[j, :, h[0]: h[1]] = False
            mask[j, a:width, past + a: past + width] = torch.ones(len(c), len(c), dtype=torch.bool).tril()
            mask[j, width:, past + a: past + width] = True  # every option token sees the whole ctx
            for m, node in enumerate(nodes):
                ids[j, width + m] = node[-1]
                pos[j, width + m] = past + len(c) + len(node) - 1
                for d in range(1, len(node) + 1):  # itself and its ancestors
                    mask[j, width + m, past + width + tries[j][1][node[:d]]] = True
            pad_cols = [x for x in range(q) if not (a <= x < width + len(nodes))]
            mask[j, pad_cols, [past + x for x in pad_cols]] = True  # padding sees itself: no empty softmax row
            spans.append((a, width + len(nodes)))
        keys = [("c", p, ctx, h, tuple(t[0])) for ((ctx, h), _), t in zip(part, tries)]
        out = _forward(lm, params, lower, keys, ids.to(dev), spans, attention_mask=_mask4d(lm, mask[:, None].to(dev)),
                       position_ids=pos.to(dev), past_key_values=prefix.cache(n), use_cache=prefix.kv is not None,
                       logits_to_keep=k + 1)
        logp = F.log_softmax(out.logits.float(), dim=-1)  # column 0: after the ctx; 1 + m: after node m
        for j, (_, members) in enumerate(part):
            index = tries[j][1]
            for i in members:
                t = rows[i].target
                cols = [0] + [1 + index[tuple(t[:d])] for d in range(1, len(t))]
                sums[i] = logp[j, cols, t].sum()
    lengths = torch.tensor([len(r.target) for r in rows], device=dev, dtype=torch.float32)
    return torch.stack(sums) if rows else torch.zeros(0, device=dev), lengths


@torch.no_grad()
def score_rows(
    lm: LM, prefix: Prefix, rows: Sequence[Row], params: Mapping[str, Tensor] | None = None, chunk: int = 32
) -> list[tuple[float, int]]:
    """(sum of target log-probs, target length) per row (no gradient): `row_logprobs` as numbers."""
    sums, lengths = row_logprobs(lm, prefix, rows, params, chunk)
    return [(s, int(n)) for s, n in zip(sums.tolist(), lengths.tolist())]


def in_context(task: Task, recipe: Recipe) -> Task:
    """The task as predictions see it: the recipe's number of demonstrations in context."""
    if recipe.predict_demos is None or recipe.predict_demos >= len(task.demonstrations):
        return task
    return task.model_copy(update={"demonstrations": task.demonstrations[: recipe.predict_demos]})


def build_prefix(
    lm: LM, fmt: Formatter, task: Task, rows: Sequence[Row], params: Mapping[str, Tensor] | None = None, cache: bool = True
) -> Prefix:
    ids, used = fmt.prefix(task.instruction, task.demonstrations, longest(rows))
    return encode_prefix(lm, ids, params, used) if cache else Prefix(ids, None, used)


@torch.no_grad()
def predict(
    lm: LM,
    task: Task,
    queries: Sequence[Query | Example],
    params: Mapping[str, Tensor] | None = None,
    recipe: Recipe = ICL,
    prior: Mapping[str, float] | None = None,
    fmt: Formatter | None = None,
    prefix: Prefix | None = None,
    cache: bool = True,
    max_new_tokens: int = 32,
) -> list[Prediction]:
    """Answer each query: the best option by score, or greedy text for generation tasks.

    Context: the task's instruction and `recipe.predict_demos` of its demonstrations (all that
    fit when None). Score: the option's mean log-likelihood per token (`recipe.length_norm`) or
    the sum, minus `prior[option]` where a prior is given (see `option_prior`) and the query
    uses the task's own options. `prefix` lets a caller (the worker) reuse a task's encoded
    prefix across requests; it must have been encoded with the same params and context, and
    leave room for these queries' rows.
    """
    fmt = fmt or Formatter(lm.encode)
    shown = in_context(task, recipe)
    per_query = [
        fmt.candidates(q.input, opts) if (opts := task.options_for(q)) else None for q in queries
    ]
    rows = [r for rs in per_query if rs for r in rs]
    gen_rows = [fmt.row(q.input, "") for q, rs in zip(queries, per_query) if rs is None]
    if prefix is None:
        prefix = build_prefix(lm, fmt, shown, rows + [Row(r.ctx, [0] * max_new_tokens) for r in gen_rows], params, cache)
    scored = iter(score_rows(lm, prefix, rows, params))
    preds: list[Prediction] = []
    for q, rs in zip(queries, per_query):
        if rs is None:
            text = generate(lm, prefix, fmt.row(q.input, "").ctx, params, max_new_tokens)
            preds.append(Prediction(text))
            continue
        opts = task.options_for(q)
        shift = prior if prior is not None and q.options is None else {}
        scores = {}
        for o in opts:
            lp, n = next(scored)
            scores[o] = (lp / n if recipe.length_norm else lp) - shift.get(o, 0.0)
        preds.append(Prediction(max(opts, key=scores.__getitem__), scores))
    return preds


def prior_of(scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Batch calibration (Zhou et al. 2023): each option's log of its mean probability over a
    batch of inputs, the probabilities being each input's softmax over its option scores.
    Subtracting it from the scores divides out the label prior the model holds whatever the
    input, which is what makes predictions collapse onto one or two labels."""
    if not scores:
        return {}
    opts = list(scores[0])
    table = torch.tensor([[s[o] for o in opts] for s in scores], dtype=torch.float64)
    mean = table.log_softmax(1).exp().mean(0)
    return {o: math.log(max(p, 1e-12)) for o, p in zip(opts, mean.tolist())}


def demo_spans(fmt: Formatter, demos: Sequence[Example], ids: list[int], used: int) -> dict[int, tuple[int, int]]:
    """Where each of the first `used` demonstrations sits in prefix `ids`, keyed by id(example):
    the span a query that is that very demonstration must not attend to."""
    spans: dict[int, tuple[int, int]] = {}
    end = len(ids)
    for d in reversed(demos[:used]):
        n = len(fmt.demo(d))
        spans[id(d)] = (end - n, end)
        end -= n
    return spans


@dataclass
class DemoScores:
    """Each demonstration's options scored as predictions score them, leave-one-out: row i of
    `sums`/`lengths` is demos[i], column j is options[j] (sum of log-probs, token count)."""

    demos: list[Example]
    options: list[str]
    sums: Tensor
    lengths: Tensor

    def scores(self, length_norm: bool) -> Tensor:
        return self.sums / self.lengths if length_norm else self.sums

    def prior(self, length_norm: bool) -> dict[str, float]:
        return prior_of([dict(zip(self.options, row)) for row in self.scores(length_norm).tolist()])


@torch.no_grad()
def demo_scores(lm: LM, task: Task, params: Mapping[str, Tensor] | None, recipe: Recipe,
                fmt: Formatter | None = None) -> DemoScores | None:
    """The task's demonstrations scored in the prediction prompt (None for tasks without one
    label set). With demonstrations in the prediction context, each one is scored with its own
    copy masked from attention (leave-one-out at the cost of one prefix: it would otherwise
    copy its label)."""
    if not task.options:
        return None
    fmt = fmt or Formatter(lm.encode)
    shown = in_context(task, recipe)
    demos = [d for d in task.demonstrations if d.options is None]
    rows = [r for d in demos for r in fmt.candidates(d.input, task.options)]
    ids, used = fmt.prefix(shown.instruction, shown.demonstrations, longest(rows))
    spans = demo_spans(fmt, shown.demonstrations, ids, used)
    hide = [spans.get(id(d)) for d in demos for _ in task.options]
    sums, lengths = row_logprobs(lm, encode_prefix(lm, ids, params, used), rows, params, hide=hide)
    shape = (len(demos), len(task.options))
    return DemoScores(demos, list(task.options), sums.view(shape), lengths.view(shape))


def option_prior(lm: LM, task: Task, params: Mapping[str, Tensor] | None, recipe: Recipe,
                 fmt: Formatter | None = None) -> dict[str, float] | None:
    """The options' prior for `predict`, estimated once from the task's own demonstrations
    scored as predictions would score them (`demo_scores`; None for tasks without one label set).
    Stored with the task, it gives every input the same answer whatever else is in its call."""
    scored = demo_scores(lm, task, params, recipe, fmt)
    return scored.prior(recipe.length_norm) if scored else None


@torch.no_grad()
def generate(
    lm: LM, prefix: Prefix, ctx: list[int], params: Mapping[str, Tensor] | None = None, max_new_tokens: int = 32
) -> str:
    """Greedy decoding after prefix + ctx; stops at a newline (the separator) or eos."""
    cache = prefix.cache(1) if prefix.kv is not None else DynamicCache()
    if prefix.kv is None:
        ctx = prefix.ids + ctx
    else:  # the expanded view is shared with the stored prefix: copy before the cache grows
        cache = DynamicCache([(k.clone(), v.clone()) for k, v in prefix.kv])
    past = len(prefix.ids) if prefix.kv is not None else 0
    x = torch.tensor([ctx], device=lm.device)
    out_ids: list[int] = []
    for _ in range(max_new_tokens):
        mask = torch.ones((1, past + x.shape[1]), dtype=torch.long, device=lm.device)
        out = lm(params, input_ids=x, attention_mask=mask, past_key_values=cache, use_cache=True)
        past += x.shape[1]
        nxt = int(out.logits[0, -1].argmax())
        if nxt == lm.eos_id:
            break
        out_ids.append(nxt)
        text = lm.tokenizer.decode(out_ids)
        if "\n" in text:
            return text.split("\n", 1)[0].strip()
        x = torch.tensor([[nxt]], device=lm.device)
    return lm.tokenizer.decode(out_ids).strip()


# --- metrics (MetaICL: macro-F1 for classification, accuracy otherwise)
def accuracy(preds: Sequence[str], golds: Sequence[str]) -> float:
    return sum(p == g for p, g in zip(preds, golds)) / max(len(golds), 1)


def macro_f1(preds: Sequence[str], golds: Sequence[str]) -> float:
    labels = sorted(set(golds) | set(preds))
    f1s = []
    for c in labels:
        tp = sum(p == c and g == c for p, g in zip(preds, golds))
        fp = sum(p == c and g != c for p, g in zip(preds, golds))
        fn = sum(p != c and g == c for p, g in zip(preds, golds))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / max(len(f1s), 1)
