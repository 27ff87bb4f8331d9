"""Option scoring and greedy generation, with a task's demonstration prefix encoded once.

An option's score is its mean per-token log-likelihood given the prompt (MetaICL: the lowest
loss wins), or the sum with `length_norm=False`. All options of all queries go through the
model as one batch (chunked), on top of the prefix's KV cache expanded to the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from model.lm import LM
from model.prompts import Formatter, Row, longest
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


@torch.no_grad()
def encode_prefix(lm: LM, ids: list[int], params: Mapping[str, Tensor] | None = None, n_demos: int = 0) -> Prefix:
    if not ids:
        return Prefix(ids, None, n_demos)
    x = torch.tensor([ids], device=lm.device)
    out = lm(params, input_ids=x, attention_mask=torch.ones_like(x), use_cache=True, logits_to_keep=1)
    kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    return Prefix(ids, kv, n_demos)


@torch.no_grad()
def score_rows(
    lm: LM, prefix: Prefix, rows: Sequence[Row], params: Mapping[str, Tensor] | None = None, chunk: int = 16
) -> list[tuple[float, int]]:
    """(sum of target log-probs, target length) per row; uses the prefix's KV cache when it has one.

    (Encoding a query once for all its options does not pay on CPU: a forward pass streams
    every weight, ~115 ms for SmolLM2 even for one token, so one pass over all rows is cheaper
    than two.)
    """
    out: list[tuple[float, int]] = []
    for i in range(0, len(rows), chunk):
        part = rows[i : i + chunk]
        cached = prefix.kv is not None
        lead = [] if cached else prefix.ids
        ids, mask = pad([lead + r.ctx + r.target for r in part], lm.eos_id, lm.device)
        if cached:
            mask = torch.cat([mask.new_ones((len(part), len(prefix.ids))), mask], dim=1)
        # the vocabulary projection is a large share of a small model's compute: only the
        # positions from the earliest target on get logits
        first = len(lead) + min(len(r.ctx) for r in part) - 1
        keep = ids.shape[1] - first
        logits = lm(params, input_ids=ids, attention_mask=mask, past_key_values=prefix.cache(len(part)),
                    use_cache=cached, logits_to_keep=keep).logits
        logp = F.log_softmax(logits.float(), dim=-1)
        for j, r in enumerate(part):
            start = len(lead) + len(r.ctx) - 1 - first  # logit row predicting this row's first target token
            tgt = torch.tensor(r.target, device=lm.device)
            lp = logp[j, start : start + len(r.target)].gather(1, tgt[:, None]).sum()
            out.append((lp.item(), len(r.target)))
    return out


def build_prefix(
    lm: LM, fmt: Formatter, task: Task, rows: Sequence[Row], params: Mapping[str, Tensor] | None = None, cache: bool = True
) -> Prefix:
    ids, used = fmt.prefix(task.instruction, task.demonstrations, longest(rows))
    return encode_prefix(lm, ids, params, used) if cache else Prefix(ids, None, used)


def predict(
    lm: LM,
    task: Task,
    queries: Sequence[Query | Example],
    params: Mapping[str, Tensor] | None = None,
    fmt: Formatter | None = None,
    prefix: Prefix | None = None,
    cache: bool = True,
    length_norm: bool = True,
    max_new_tokens: int = 32,
) -> list[Prediction]:
    """Answer each query in context: the best option by score, or greedy text for generation tasks.

    `prefix` lets a caller (the worker) reuse a task's encoded prefix across requests; it must
    have been encoded with the same params and must leave room for these queries' rows.
    """
    fmt = fmt or Formatter(lm.encode)
    per_query = [
        fmt.candidates(q.input, opts) if (opts := task.options_for(q)) else None for q in queries
    ]
    rows = [r for rs in per_query if rs for r in rs]
    gen_rows = [fmt.row(q.input, "") for q, rs in zip(queries, per_query) if rs is None]
    if prefix is None:
        prefix = build_prefix(lm, fmt, task, rows + [Row(r.ctx, [0] * max_new_tokens) for r in gen_rows], params, cache)
    scored = iter(score_rows(lm, prefix, rows, params))
    preds: list[Prediction] = []
    for q, rs in zip(queries, per_query):
        if rs is None:
            text = generate(lm, prefix, fmt.row(q.input, "").ctx, params, max_new_tokens)
            preds.append(Prediction(text))
            continue
        opts = task.options_for(q)
        scores = {}
        for o in opts:
            lp, n = next(scored)
            scores[o] = lp / n if length_norm else lp
        preds.append(Prediction(max(opts, key=scores.__getitem__), scores))
    return preds


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
