"""model/generation.py: greedy decoding as /predict's, stop sequences cut before they begin, seeded sampling, the token budget and the caller stopping it."""

import pytest
import torch

from model.adapt import adapt
from model.generation import Sampling, stream
from model.prefix import build_prefix
from model.prompts import Formatter, Row
from model.recipe import Recipe
from model.scoring import generate
from model.task import Task

from helpers import tiny_lm

TASK = Task(demonstrations=[{"input": "capital of france", "output": "paris"}, {"input": "capital of italy", "output": "rome"}])


@pytest.fixture(scope="module")
def setup():
    lm = tiny_lm()
    params = adapt(lm, TASK, Recipe(loss="lm", epochs=40, lr=3e-2, calibrate=False, min_demos=0), "lora").params  # says something
    return lm, params, Formatter(lm.encode)


def run(setup, text: str, sp: Sampling, stopped=lambda: False):
    lm, params, fmt = setup
    ctx = fmt.row(text, "").ctx
    prefix = build_prefix(lm, fmt, TASK, [Row(ctx, [0] * sp.max_tokens)], params)
    return list(stream(lm, prefix, ctx, params, sp, stopped)), prefix, ctx


def test_greedy_text_is_the_predict_answer_and_the_pieces_add_up(setup):
    lm, params, _ = setup
    pieces, prefix, ctx = run(setup, "capital of spain", Sampling(max_tokens=32))
    text = "".join(p.text for p in pieces)
    assert len(pieces) > 2 and text.strip() == generate(lm, prefix, ctx, params, 32)
    assert [p.finish for p in pieces[:-1]] == [None] * (len(pieces) - 1) and pieces[-1].finish in ("stop", "length")
    assert pieces[-1].tokens <= 32


def test_a_stop_sequence_ends_the_text_and_no_part_of_it_is_emitted(setup):
    full = "".join(p.text for p in run(setup, "capital of spain", Sampling(max_tokens=32))[0])
    stop = full[4:7]
    pieces, _, _ = run(setup, "capital of spain", Sampling(max_tokens=32, stop=(stop,)))
    assert "".join(p.text for p in pieces) == full[: full.index(stop)] and pieces[-1].finish == "stop"


def test_sampling_is_repeatable_with_a_seed_and_max_tokens_bounds_it(setup):
    texts = ["".join(p.text for p in run(setup, "capital of spain", Sampling(max_tokens=6, temperature=1.5, seed=s))[0])
             for s in (1, 1, 2, 3)]
    assert texts[0] == texts[1] and len(set(texts)) > 1
    pieces, _, _ = run(setup, "capital of spain", Sampling(max_tokens=3))
    assert pieces[-1].tokens <= 3 and (pieces[-1].finish == "length") == (pieces[-1].tokens == 3)
    nucleus = run(setup, "capital of spain", Sampling(max_tokens=6, temperature=1.0, top_p=1e-6, seed=9))[0]
    greedy = run(setup, "capital of spain", Sampling(max_tokens=6))[0]
    assert "".join(p.text for p in nucleus) == "".join(p.text for p in greedy)  # a tiny nucleus is the top token


def test_a_caller_that_stops_gets_no_more_pieces(setup):
    asked = []

    def stopped() -> bool:
        asked.append(1)
        return len(asked) > 2

    pieces, _, _ = run(setup, "capital of spain", Sampling(max_tokens=32), stopped)
    assert len(asked) == 3 and len(pieces) <= 2 and all(p.finish is None for p in pieces)
