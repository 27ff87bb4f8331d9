"""The real default model, end to end: load (converting the GGUF once), predict in context, adapt."""

import json
import random
from pathlib import Path

import pytest

from model.adapt import adapt
from model.recipe import DEFAULT, ICL, Recipe
from model.loading import load_lm
from model.scoring import predict
from model.settings import get_settings
from model.task import Example, Task

pytestmark = pytest.mark.slow
FIXTURE = Path(__file__).parent / "fixtures" / "topics.json"


@pytest.fixture(scope="module")
def lm():
    return load_lm("smollm2", get_settings().data_dir, device="cpu")


@pytest.fixture(scope="module")
def topics():
    data = json.loads(FIXTURE.read_text())
    ex = [Example(**e) for e in data["examples"]]
    rng = random.Random(0)
    demos = [rng.choice([e for e in ex if e.output == o]) for o in data["options"]]  # one per label
    rng.shuffle(demos)
    return data, demos, [e for e in ex if e not in demos]


def test_loads_the_embedded_model(lm):
    assert sum(p.numel() for n, p in lm.model.named_parameters() if n in set(lm.full_names)) == 134_515_008
    assert lm.eos_id == 2 and lm.encode(" positive") == [2731]


def test_in_context_topic_classification(lm, topics):
    data, demos, queries = topics
    task = Task(demonstrations=demos, instruction=data["instruction"], options=data["options"])
    preds = predict(lm, task, queries)
    acc = sum(p.output == q.output for p, q in zip(preds, queries)) / len(queries)
    assert acc >= 0.5, acc  # chance is 0.2; measured 0.64 with these 5 demonstrations
    uncached = predict(lm, task, queries[:2], cache=False)
    for a, b in zip(preds[:2], uncached):
        assert a.scores == pytest.approx(b.scores, abs=1e-4)


def test_lora_adaptation_lowers_support_loss(lm, topics):
    data, demos, _ = topics
    task = Task(demonstrations=demos * 2, instruction=data["instruction"], options=data["options"])
    a = adapt(lm, task, Recipe(loss="lm", batch_size=2, context_demos=2, lr=1e-3, min_steps=3, max_steps=3, calibrate=False))
    assert a.loss_after < a.loss_before


def test_default_recipe_learns_labels_only_the_demonstrations_name(lm):
    """The service's default adaptation on a task whose labels (letters) say nothing: only the
    demonstrations tell the mapping. It must beat MetaICL's in-context prediction from the same
    demonstrations, and not collapse onto one label."""
    data = json.loads(FIXTURE.read_text())
    letter = {o: "ABCDE"[i] for i, o in enumerate(data["options"])}
    ex = [Example(input=e["input"], output=letter[e["output"]]) for e in data["examples"]]
    rng = random.Random(0)
    rng.shuffle(ex)
    demos = [e for o in "ABCDE" for e in [x for x in ex if x.output == o][:3]]  # 3 per label
    rng.shuffle(demos)
    queries = [e for e in ex if e not in demos]
    task = Task(demonstrations=demos, instruction="Classify the news headline.", options=list("ABCDE"))

    def accuracy(preds):
        return sum(p.output == q.output for p, q in zip(preds, queries)) / len(queries)

    icl = accuracy(predict(lm, task, queries, recipe=ICL))
    a = adapt(lm, task)  # DEFAULT
    preds = predict(lm, task, queries, params=a.params, recipe=DEFAULT, prior=a.prior)
    print(f"letters: in context {icl:.2f}, default adaptation {accuracy(preds):.2f}")
    assert a.loss_after < a.loss_before
    # measured: in context 0.27 (4 of 15), default adaptation 0.60 (9 of 15); chance is 0.2
    assert accuracy(preds) >= max(icl + 0.2, 0.5), (icl, accuracy(preds))
    assert len({p.output for p in preds}) >= 4  # no collapse onto one or two letters


def test_packed_option_scores_equal_a_plain_forward_per_option(lm, topics):
    """The one prediction path (query once on the cached prefix, options packed as a trie after
    it) scores SmolLM2's options exactly as one plain forward over prefix + query + option each."""
    import torch

    from model.prompts import Row
    from model.prefix import encode_prefix, row_logprobs

    data, demos, queries = topics
    prefix_ids = lm.encode("".join(f"{d.input}\n{d.output}\n\n" for d in demos))
    options = data["options"] + ["sports news", "sports and politics"]  # shared beginnings
    rows = [Row(lm.encode(q.input + "\n"), lm.encode(o)) for q in queries[:2] for o in options]
    with torch.no_grad():
        sums, lengths = row_logprobs(lm, encode_prefix(lm, prefix_ids), rows)
        for r, got, n in zip(rows, sums.tolist(), lengths.tolist()):
            ids = torch.tensor([prefix_ids + r.ctx + r.target])
            logp = torch.log_softmax(lm(None, input_ids=ids).logits[0, :-1].float(), -1)
            start = len(prefix_ids) + len(r.ctx) - 1
            alone = logp[start:start + len(r.target)].gather(1, torch.tensor(r.target)[:, None]).sum().item()
            assert got == pytest.approx(alone, abs=1e-4) and n == len(r.target)


def test_the_shipped_checkpoint_loads_on_smollm2(lm):
    """What a fresh install's worker does before it activates it (worker.checkpoints.install_shipped)."""
    from model import checkpoints

    shipped = [m for m in checkpoints.list_checkpoints(checkpoints.SHIPPED) if m["base_model"]["name"] == lm.name]
    assert shipped, "a checkpoint ships for SmolLM2"
    meta = checkpoints.verify(checkpoints.SHIPPED, shipped[-1]["id"], lm)
    assert meta["evaluation"]["report-k16"]["macro_f1"] and meta["command"].startswith("python -m model.meta_train")
