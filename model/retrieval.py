"""Demonstrations chosen per query (`Recipe.retrieve`): embeddings from the base model's own mean-pooled
hidden states (`embed`), each query's nearest demonstrations by cosine similarity, label-balanced and
within the context budget (`choose`, `contexts`), and the rule for when retrieval applies (`applies`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from model.lm import LM
from model.prefix import pad
from model.prompts import Formatter
from model.recipe import Recipe
from model.task import Example, Query, Task


@torch.no_grad()
def embed(lm: LM, texts: Sequence[str], batch: int = 32) -> Tensor:
    """One L2-normalised row per text: the mean over its tokens of the base model's last hidden
    state (the module as loaded, never a task's weights: a demonstration's embedding does not
    change with adaptation, so it is computed once per task). float32, on the CPU."""
    ids = [lm.encode(t) or [lm.eos_id] for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # like lengths together: less padding
    rows: dict[int, Tensor] = {}
    for c in range(0, len(order), batch):
        part = order[c: c + batch]
        x, mask = pad([ids[i] for i in part], lm.eos_id, lm.device)
        out = lm(None, input_ids=x, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
        m = mask.unsqueeze(-1).float()
        pooled = (out.hidden_states[-1].float() * m).sum(1) / m.sum(1)
        for i, row in zip(part, F.normalize(pooled, dim=-1).cpu()):
            rows[i] = row
    return torch.stack([rows[i] for i in range(len(ids))]) if ids else torch.zeros(0, 0)


def label_of(task: Task, d: Example) -> str | None:
    """What balancing counts: the demonstration's output where the task has one label set;
    None (one group: plain nearest) for generation tasks and demonstrations with options of their own."""
    return d.output if task.options and d.options is None else None


def choose(sims: Tensor, labels: Sequence[str | None], sizes: Sequence[int], k: int, room: int,
           exclude: int | None = None) -> tuple[int, ...]:
    """Up to k demonstrations by similarity, round-robin over the labels (the label of the most
    similar first), each taken only if its `sizes` tokens still fit in `room`; returned in the
    task's order, so that queries choosing the same set get the same prompt (and share it)."""
    ranked = sims.argsort(descending=True, stable=True).tolist()
    queues: dict[str | None, list[int]] = {}
    for i in ranked:
        if i != exclude:
            queues.setdefault(labels[i], []).append(i)
    lanes = [q[::-1] for q in queues.values()]  # popped from the end: nearest first
    chosen: list[int] = []
    while lanes and len(chosen) < k:
        for lane in list(lanes):
            while lane and sizes[lane[-1]] > room:
                lane.pop()  # too long for what is left of the budget: the next of this label
            if not lane:
                lanes.remove(lane)
                continue
            i = lane.pop()
            chosen.append(i)
            room -= sizes[i]
            if len(chosen) == k:
                break
    return tuple(sorted(chosen))


def applies(fmt: Formatter, task: Task, recipe: Recipe, longest_row: int) -> bool:
    """Whether a query with rows this long gets demonstrations chosen for it (the rule in `Recipe`):
    retrieval is on, the prompt is not pinned to a number of demonstrations (`predict_demos`), there
    are more demonstrations than `retrieve`, and they do not all fit the context budget beside the rows."""
    # n <= retrieve: there is nothing to choose among; the fixed prompt is the measured recipe (k=16)
    if recipe.retrieve is None or recipe.predict_demos is not None or len(task.demonstrations) <= recipe.retrieve:
        return False
    return fmt.prefix(task.instruction, task.demonstrations, longest_row)[1] < len(task.demonstrations)


def task_embeddings(lm: LM, fmt: Formatter, task: Task, recipe: Recipe) -> Tensor | None:
    """The demonstrations' embeddings where predictions will retrieve (None where the fixed prompt
    holds them all): computed once, at adaptation time. The longest demonstration (with its own
    output) stands for the queries; a longer query that tips the rule gets them computed then."""
    probe = max((len(r.ctx) + len(r.target) for r in (fmt.row(d.input, d.output) for d in task.demonstrations)), default=0)
    return embed(lm, [d.input for d in task.demonstrations]) if applies(fmt, task, recipe, probe) else None


def contexts(lm: LM, fmt: Formatter, task: Task, recipe: Recipe, queries: Sequence[Query | Example],
             longest: Sequence[int], embeddings: Tensor, exclude: Sequence[int | None] | None = None,
             sizes: Sequence[int] | None = None, query_embeddings: Tensor | None = None) -> list[tuple[int, ...]]:
    """Each query's chosen demonstrations (indices into task.demonstrations): `choose` with the
    room its own rows (`longest[i]` tokens) leave in the budget; `exclude[i]`, a demonstration
    the query must not see (itself, when demonstrations are scored for calibration)."""
    demos = task.demonstrations
    sizes = sizes if sizes is not None else [len(fmt.demo(d)) for d in demos]
    labels = [label_of(task, d) for d in demos]
    head = len(fmt.instruction(task.instruction))
    qe = query_embeddings if query_embeddings is not None else embed(lm, [q.input for q in queries])
    sims = qe @ embeddings.T
    exclude = exclude or [None] * len(queries)
    out = []
    for i in range(len(queries)):
        room = fmt.budget - longest[i]
        room -= head if head <= room else 0  # Formatter.prefix drops the instruction first when it does not fit
        out.append(choose(sims[i], labels, sizes, recipe.retrieve or 0, room, exclude[i]))
    return out


def grouped(chosen: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], list[int]]:
    """Query positions by their chosen set: identical sets share one prefix."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, c in enumerate(chosen):
        groups.setdefault(c, []).append(i)
    return groups


def shown(task: Task, chosen: tuple[int, ...]) -> Task:
    """The task as one group's queries see it: its chosen demonstrations alone."""
    return task.model_copy(update={"demonstrations": [task.demonstrations[i] for i in chosen]})
