"""A task's prompt prefix: the demonstrations it shows (`in_context`), encoded once into a KV cache
(`Prefix`, `encode_prefix`, `build_prefix`), and rows scored on top of it (`row_logprobs`, options
packed as a trie); `Lower` runs the frozen layers under a LoRA once across adaptation steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from model.lm import LM
from model.prompts import Formatter, Row, longest
from model.recipe import Recipe
from model.task import Task


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
