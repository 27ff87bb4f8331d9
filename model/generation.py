"""Generation with sampling, stop sequences and text streamed as it is made, on a task's encoded prefix.

`model.scoring.generate` is the greedy answer /predict gives; this is what the OpenAI-compatible
completions need besides: temperature and nucleus sampling (seeded), a caller's stop sequences,
a token budget, and the text in pieces as soon as no stop sequence can still begin in them.
Greedy decoding here (temperature 0) produces the same tokens as `generate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from model.lm import LM
from model.prefix import Prefix

# The prompt format ends an answer at a newline (examples are separated by one): a newline always stops.
NEWLINE = "\n"


@dataclass
class Sampling:
    """How to pick each next token. temperature 0: the most likely one (greedy)."""

    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Piece:
    """Text to emit; `finish` is set on the last piece: "stop" (eos, a newline or a stop sequence) or
    "length" (max_tokens reached). `tokens`: tokens generated so far."""

    text: str
    tokens: int
    finish: str | None = None


def _pick(logits: Tensor, sp: Sampling, gen: torch.Generator | None) -> int:
    if sp.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sp.temperature, dim=-1)
    if sp.top_p < 1:
        p, idx = probs.sort(descending=True)
        keep = p.cumsum(0) - p < sp.top_p  # the smallest set whose mass reaches top_p (the first always)
        probs = torch.zeros_like(probs).scatter(0, idx[keep], p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


@torch.no_grad()
def tokens(lm: LM, prefix: Prefix, ctx: list[int], params: Mapping[str, Tensor] | None, sp: Sampling) -> Iterator[int]:
    """Token ids after prefix + ctx, until eos (not yielded) or max_tokens."""
    if prefix.kv is None:
        cache, ctx, past = DynamicCache(), prefix.ids + ctx, 0
    else:  # a copy: the stored prefix's cache must not grow
        cache, past = DynamicCache([(k.clone(), v.clone()) for k, v in prefix.kv]), len(prefix.ids)
    gen = None
    if sp.temperature > 0:
        gen = torch.Generator().manual_seed(sp.seed if sp.seed is not None else int(torch.seed() % 2**63))
    x = torch.tensor([ctx], device=lm.device)
    for _ in range(sp.max_tokens):
        mask = torch.ones((1, past + x.shape[1]), dtype=torch.long, device=lm.device)
        out = lm(params, input_ids=x, attention_mask=mask, past_key_values=cache, use_cache=True)
        past += x.shape[1]
        nxt = _pick(out.logits[0, -1], sp, gen)
        if nxt == lm.eos_id:
            return
        yield nxt
        x = torch.tensor([[nxt]], device=lm.device)


def _held(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of text could be the beginning of a stop sequence."""
    for n in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


def stream(lm: LM, prefix: Prefix, ctx: list[int], params: Mapping[str, Tensor] | None, sp: Sampling,
           stopped: Callable[[], bool] = lambda: False) -> Iterator[Piece]:
    """The generated text in pieces; the last piece carries the finish reason. The text ends
    before the first stop sequence (or newline) and never includes it; it is not stripped, so the
    pieces add up to exactly the text. `stopped()` is asked after every token: True ends the
    generation (the caller went away) with no further piece."""
    stops = (NEWLINE, *sp.stop)
    ids: list[int] = []
    sent = 0
    for t in tokens(lm, prefix, ctx, params, sp):
        if stopped():
            return
        ids.append(t)
        text = lm.tokenizer.decode(ids)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            yield Piece(text[sent:cut], len(ids), "stop")
            return
        # hold back what may start a stop sequence, and a character still being decoded (U+FFFD)
        end = len(text) - _held(text, stops)
        while end > sent and text[end - 1] == "\ufffd":
            end -= 1
        if end > sent:
            yield Piece(text[sent:end], len(ids))
            sent = end
    text = lm.tokenizer.decode(ids)
    yield Piece(text[sent:], len(ids), "length" if len(ids) >= sp.max_tokens else "stop")  # else eos came
