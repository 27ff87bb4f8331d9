"""One task's examples for an outer step (a `Draw`): support and query sets drawn within the token
budget, labels remapped to symbols, and the episodes of the run's inner context."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from model.adapt import support_episodes
from model.losses import Episode, sequences
from model.bank.sampling import sample_episode
from model.meta_config import MetaTrainConfig
from model.prompts import Formatter, longest
from model.task import Example


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


def fits(fmt: Formatter, ex: Example, budget: int) -> bool:
    r = fmt.row(ex.input, ex.output)
    return len(r.ctx) + len(r.target) <= budget


def fitting_episode(task: Any, rng: random.Random, n_support: int, n_query: int, fmt: Formatter,
                    max_row: int, tries: int = 8) -> tuple[list[Example], list[Example]]:
    """The bank's episode (`model.bank.sampling.sample_episode`: disjoint support and query examples
    from the train split, label-balanced support) less the examples whose row exceeds max_row
    tokens (the prompt budget could not hold them beside any demonstration); redrawn when too few fit."""
    for _ in range(tries):
        support, queries = sample_episode(task, n_support, n_query, rng)
        support = [e for e in support.demonstrations if fits(fmt, e, max_row)]
        queries = [e for e in queries if fits(fmt, e, max_row)]
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


def context_episodes(cfg: MetaTrainConfig, support: list[Example], queries: list[Example], steps: int,
                     rng: random.Random) -> tuple[Episode, list[Episode]]:
    """The query episode and `steps` support episodes of `support_batch` examples each, in the
    run's inner context (`inner_context`): what each support and query example sees.

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
    """
    if cfg.inner_context == "sampled":
        q_ep = query_episode(support, queries, cfg.context_demos, rng)
        return q_ep, support_episodes(support, steps, cfg.support_batch, cfg.context_demos, rng)
    # "recipe": the prediction prompt holds the whole support set, so no example gets a context of its own
    return [([], q) for q in queries], support_episodes(support, steps, cfg.support_batch, 0, rng)


def draw(cfg: MetaTrainConfig, fmt: Formatter, max_row: int, task: Any, rng: random.Random) -> Draw:
    """A task's examples for one step, every draw from `rng` (the step's)."""
    support, queries = fitting_episode(task, rng, cfg.support_size, cfg.query_size, fmt, max_row)
    options, instruction = task.options, task.instruction
    # the coin is drawn only when remapping is on: runs without it keep their exact draws
    if cfg.remap and options and rng.random() < cfg.remap:
        # the instruction goes too: it may name the original labels
        support, queries, options = remap_labels(support, queries, options, rng)
        instruction = None
    q_ep, episodes = context_episodes(cfg, support, queries, 0 if cfg.order is None else cfg.inner_steps, rng)
    if cfg.inner_context == "sampled":
        tokens = sum(episode_tokens(fmt, instruction, ep) for ep in [q_ep, *episodes])
    else:
        tokens = sum(prompt_tokens(fmt, instruction, support, ep) for ep in [q_ep, *episodes])
    return Draw(support, q_ep, episodes, tokens, options, instruction)
