"""The losses adaptation steps down, on one episode (query demonstrations, each with its context):
the in-context LM loss (MetaICL's), the loss over option scores (in the prediction prompt or the
episode's own contexts), and the recipe's choice between them (`episode_loss`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from model.calibration import DemoScores, demo_spans
from model.lm import LM
from model.prefix import Lower, encode_prefix, pad, row_keys, row_logprobs
from model.prompts import Formatter, Row, longest
from model.recipe import Recipe
from model.task import Example

Episode = list[tuple[list[Example], Example]]  # (context demonstrations, query) pairs: one batch


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
