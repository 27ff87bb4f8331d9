import pytest
import torch

from model.metrics import accuracy, macro_f1
from model.prefix import Prefix, build_prefix, encode_prefix, score_rows
from model.prompts import Formatter, PromptTooLong, Row
from model.recipe import ICL
from model.scoring import predict
from model.task import Example, Query, Task

from helpers import sentiment_task, tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.mark.parametrize("fmt", ["direct", "channel"])
def test_cached_and_uncached_scores_agree(lm, fmt):
    task = sentiment_task(instruction="Is the review positive or negative?")
    queries = [Query(input="what a film"), Query(input="dull"), Query(input="pick one", options=["a", "bb", "ccc d"])]
    f = Formatter(lm.encode, fmt)
    cached = predict(lm, task, queries, fmt=f, cache=True)
    plain = predict(lm, task, queries, fmt=f, cache=False)
    for a, b in zip(cached, plain):
        assert a.output == b.output
        assert a.scores.keys() == b.scores.keys()
        for o in a.scores:
            assert a.scores[o] == pytest.approx(b.scores[o], abs=1e-5)


def test_cached_rows_of_different_lengths_agree_with_full_sequences(lm):
    prefix_ids = lm.encode("the movie was great\npositive\n\n")
    rows = [Row(lm.encode("x\n"), lm.encode("a b c d e")), Row(lm.encode("longer query text\n"), lm.encode("z"))]
    cached = score_rows(lm, encode_prefix(lm, prefix_ids), rows)
    plain = score_rows(lm, Prefix(prefix_ids), rows)
    # a third path: each row alone, no padding at all
    alone = [score_rows(lm, Prefix(prefix_ids), [r])[0] for r in rows]
    for (a, n), (b, m), (c, k) in zip(cached, plain, alone):
        assert n == m == k
        assert a == pytest.approx(b, abs=1e-5) and a == pytest.approx(c, abs=1e-5)


def test_right_option_wins(lm):
    """Of two one-word options, the one the model finds most likely after the prompt must win;
    an off-by-one in target alignment would score the wrong position and break this."""
    task = sentiment_task(3)
    f = Formatter(lm.encode)
    q = "the plot"
    prefix, _ = f.prefix(None, task.demonstrations)
    with torch.no_grad():
        logits = lm(None, input_ids=torch.tensor([prefix + f.row(q, "").ctx])).logits[0, -1]
    words = {i: lm.tokenizer.decode([i]) for i in range(logits.shape[0])}
    words = {i: w for i, w in words.items() if w.isalpha() and len(w) > 1 and lm.encode(w) == [i]}
    best = words[max(words, key=lambda i: logits[i])]
    worst = words[min(words, key=lambda i: logits[i])]
    t = Task(demonstrations=task.demonstrations)
    for norm in (True, False):
        pred = predict(lm, t, [Query(input=q, options=[worst, best])], recipe=ICL.but(length_norm=norm))[0]
        assert pred.output == best
        expected = torch.log_softmax(logits, -1)
        assert pred.scores[best] == pytest.approx(expected[lm.encode(best)[0]].item(), abs=1e-4)


def test_generation_cached_matches_uncached_and_stops_at_newline(lm):
    task = Task(demonstrations=[{"input": "paris", "output": "france"}, {"input": "rome", "output": "italy"}])
    a = predict(lm, task, [Query(input="berlin")], max_new_tokens=8)[0]
    b = predict(lm, task, [Query(input="berlin")], max_new_tokens=8, cache=False)[0]
    assert a.output == b.output and a.scores is None
    assert "\n" not in a.output


def test_prefix_drops_demonstrations_to_fit_and_never_cuts_the_query(lm):
    task = sentiment_task(10)
    f = Formatter(lm.encode, budget=60)
    rows = f.candidates("the plot was fine", task.options)
    prefix = build_prefix(lm, f, task, rows)
    assert 0 < prefix.n_demos < 10
    assert len(prefix.ids) + max(len(r.ctx) + len(r.target) for r in rows) <= 60
    with pytest.raises(PromptTooLong, match="context budget is 5"):
        Formatter(lm.encode, budget=5).prefix(None, task.demonstrations, longest_row=20)


def test_an_instruction_that_does_not_fit_is_dropped_not_fatal():
    """With or without demonstrations (a zero-shot prompt): the query fits, so it is answered."""
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    f = Formatter(enc, budget=30)
    long_instruction = "x" * 40
    assert f.prefix(long_instruction, [], longest_row=20) == ([], 0)
    assert f.prefix("short", [], longest_row=20) == (f.instruction("short"), 0)
    with pytest.raises(PromptTooLong):
        f.prefix(None, [], longest_row=31)


def test_channel_puts_the_option_first():
    enc = lambda s: [ord(c) for c in s]  # noqa: E731 - a character tokenizer keeps the test readable
    d = Formatter(enc, "direct").row("in", "out")
    c = Formatter(enc, "channel").row("in", "out")
    assert d == Row(enc("in\n"), enc("out")) and c == Row(enc("out\n"), enc("in"))
    with pytest.raises(ValueError, match="prompt format"):
        Formatter(enc, "bogus")


def test_metrics():
    golds = ["a", "a", "b", "b"]
    assert accuracy(["a", "b", "b", "b"], golds) == 0.75
    # class a: p=1 r=.5 f1=2/3; class b: p=2/3 r=1 f1=.8
    assert macro_f1(["a", "b", "b", "b"], golds) == pytest.approx((2 / 3 + 0.8) / 2)
    assert macro_f1(["a", "a", "a", "a"], golds) == pytest.approx((2 / 3 + 0) / 2)


def test_hidden_prefix_span_matches_a_full_forward_with_that_span_masked(lm):
    """A demonstration scored without seeing its own copy: its span of the cached prefix is masked,
    exactly as a plain forward over the whole sequence with those positions masked (the span is
    the prefix's last demonstration, so in both only the query is kept from seeing it)."""
    from model.prefix import row_logprobs

    first, last = lm.encode("the movie was great\npositive\n\n"), lm.encode("i hated it\nnegative\n\n")
    prefix_ids = first + last
    row = Row(lm.encode("i hated it\n"), lm.encode("negative"))
    span = (len(first), len(prefix_ids))
    (hidden,), _ = row_logprobs(lm, encode_prefix(lm, prefix_ids), [row], hide=[span])
    (seen,), _ = row_logprobs(lm, encode_prefix(lm, prefix_ids), [row])
    ids = torch.tensor([prefix_ids + row.ctx + row.target])
    mask = torch.ones_like(ids)
    mask[0, span[0]: span[1]] = 0
    with torch.no_grad():
        logp = torch.log_softmax(lm(None, input_ids=ids, attention_mask=mask).logits[0, :-1], -1)
    start = len(prefix_ids) + len(row.ctx) - 1
    expected = logp[start: start + len(row.target)].gather(1, torch.tensor(row.target)[:, None]).sum()
    assert hidden.item() == pytest.approx(expected.item(), abs=1e-4)
    assert abs(hidden.item() - seen.item()) > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_options_sharing_a_beginning_score_as_each_alone(attn):
    """Options packed as a trie after their query (shared beginnings computed once) get exactly
    the log-likelihood a plain forward pass over prefix + query + option gives each one."""
    from model.prefix import row_logprobs

    lm = tiny_lm(attn=attn)
    prefix_ids = lm.encode("the movie was great\npositive\n\n")
    options = ["neutral", "neutral sports", "neutral sports world", "[a]", "[b]", "yes"]
    rows = [Row(lm.encode(q + "\n"), lm.encode(o)) for q in ("a dull film", "ok") for o in options]
    rows.append(Row(lm.encode("x\n"), lm.encode("positive negative")))
    for prefix in (encode_prefix(lm, prefix_ids), Prefix(prefix_ids)):
        with torch.no_grad():
            sums, lengths = row_logprobs(lm, prefix, rows)
        for r, got, n in zip(rows, sums.tolist(), lengths.tolist()):
            ids = torch.tensor([prefix_ids + r.ctx + r.target])
            with torch.no_grad():
                logp = torch.log_softmax(lm(None, input_ids=ids).logits[0, :-1], -1)
            start = len(prefix_ids) + len(r.ctx) - 1
            alone = logp[start:start + len(r.target)].gather(1, torch.tensor(r.target)[:, None]).sum().item()
            assert got == pytest.approx(alone, abs=1e-4) and n == len(r.target)
