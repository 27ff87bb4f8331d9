"""Predictions: each query's best option by score (`predict`), or greedy text (`generate`), on the task's
prompt prefix encoded once (`model.prefix`). An option's score is its mean per-token log-likelihood
given the prompt (MetaICL: the lowest loss wins), or the sum with `length_norm=False`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from model.head import Head, combine
from model.lm import LM
from model.prefix import Prefix, build_prefix, in_context, score_rows
from model.prompts import Formatter, Row, longest
from model.recipe import ICL, Recipe
from model.retrieval import applies, contexts, embed, grouped, shown as chosen_task
from model.task import Example, Query, Task



@dataclass
class Prediction:
    output: str
    scores: dict[str, float] | None = None  # option -> score (higher is better); None for generation


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
    embeddings: Tensor | None = None,
    rows: Sequence[list[Row]] | None = None,
    head: Head | None = None,
) -> list[Prediction]:
    """Answer each query: the best option by score, or greedy text for generation tasks.

    Context: the task's instruction and `recipe.predict_demos` of its demonstrations (all that
    fit when None). Score: the option's mean log-likelihood per token (`recipe.length_norm`) or
    the sum, minus `prior[option]` where a prior is given (see `option_prior`) and the query
    uses the task's own options. `prefix` lets a caller (the worker) reuse a task's encoded
    prefix across requests; it must have been encoded with the same params and context, and
    leave room for these queries' rows.

    With `recipe.retrieve`, where the fixed prompt would not show every demonstration, each
    query gets its nearest ones instead (`model.retrieval`; `embeddings` are the demonstrations',
    computed here when not given), and queries that chose the same set share one prefix.
    `rows`: the queries' `query_rows`, where the caller made them already (the worker sizes the
    prefix with them). `head`: the task's fitted bag-of-words head (`model.head`), whose
    log-probabilities join the scores of queries on the task's own options, weighted `recipe.head`.
    """
    preds = _predict(lm, task, queries, params, recipe, prior, fmt, prefix, cache, max_new_tokens, embeddings, rows)
    if head is None or not recipe.head:
        return preds
    mine = [i for i, q in enumerate(queries) if q.options is None and preds[i].scores is not None]
    for i, lp in zip(mine, head.log_probs([queries[i].input for i in mine], task.options or [])):
        scores = combine(preds[i].scores, lp, recipe.head)
        preds[i] = Prediction(max(scores, key=scores.__getitem__), scores)
    return preds


def _predict(lm: LM, task: Task, queries: Sequence[Query | Example], params: Mapping[str, Tensor] | None,
             recipe: Recipe, prior: Mapping[str, float] | None, fmt: Formatter | None, prefix: Prefix | None,
             cache: bool, max_new_tokens: int, embeddings: Tensor | None,
             rows: Sequence[list[Row]] | None) -> list[Prediction]:
    """`predict` with the language model alone."""
    fmt = fmt or Formatter(lm.encode)
    shown = in_context(task, recipe)
    per_query = rows if rows is not None else query_rows(fmt, task, queries, max_new_tokens)
    every = [r for rs in per_query for r in rs]
    if prefix is None and applies(fmt, task, recipe, longest(every)):
        return _retrieved(lm, task, queries, per_query, params, recipe, prior, fmt, cache, max_new_tokens, embeddings)
    if prefix is None:
        prefix = build_prefix(lm, fmt, shown, every, params, cache)
    scored = iter(score_rows(lm, prefix, [r for q, rs in zip(queries, per_query) if task.options_for(q) for r in rs],
                             params))
    preds: list[Prediction] = []
    for q, rs in zip(queries, per_query):
        opts = task.options_for(q)
        if not opts:
            text = generate(lm, prefix, rs[0].ctx, params, max_new_tokens)
            preds.append(Prediction(text))
            continue
        shift = prior if prior is not None and q.options is None else {}
        scores = {}
        for o in opts:
            lp, n = next(scored)
            scores[o] = (lp / n if recipe.length_norm else lp) - shift.get(o, 0.0)
        preds.append(Prediction(max(opts, key=scores.__getitem__), scores))
    return preds


def query_rows(fmt: Formatter, task: Task, queries: Sequence[Query | Example], max_new_tokens: int) -> list[list[Row]]:
    """Each query as the rows it is scored on: one per option (input + option), or, to generate,
    one whose target is room for max_new_tokens."""
    return [fmt.candidates(q.input, opts) if (opts := task.options_for(q))
            else [Row(fmt.row(q.input, "").ctx, [0] * max_new_tokens)] for q in queries]


def _retrieved(lm: LM, task: Task, queries: Sequence[Query | Example], rows: Sequence[list[Row]],
               params: Mapping[str, Tensor] | None, recipe: Recipe, prior: Mapping[str, float] | None, fmt: Formatter,
               cache: bool, max_new_tokens: int, embeddings: Tensor | None) -> list[Prediction]:
    """`predict` with each query's own chosen demonstrations: one fixed-prompt call per distinct set."""
    if embeddings is None:
        embeddings = embed(lm, [d.input for d in task.demonstrations])
    chosen = contexts(lm, fmt, task, recipe, queries, [longest(rs) for rs in rows], embeddings)
    fixed = recipe.but(retrieve=None, predict_demos=None)
    preds: list[Prediction | None] = [None] * len(queries)
    for c, members in grouped(chosen).items():
        got = _predict(lm, chosen_task(task, c), [queries[i] for i in members], params, fixed, prior, fmt, None,
                       cache, max_new_tokens, None, [rows[i] for i in members])
        for i, p in zip(members, got):
            preds[i] = p
    return preds  # type: ignore[return-value]


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
