import random

import pytest
import torch

from model.adapt import adapt, inner_loop, start_params, support_episodes
from model.losses import icl_loss, option_loss
from model.optim import AdamState, adam_update
from model.prompts import Formatter
from model.recipe import Recipe
from model.scoring import predict

from helpers import sentiment_task, tiny_lm


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.mark.parametrize("mode,lr", [("lora", 2e-2), ("full", 3e-3)])
def test_adaptation_lowers_support_loss(lm, mode, lr):
    task = sentiment_task()
    before = {k: v.clone() for k, v in lm.params("full").items()}
    a = adapt(lm, task, Recipe(loss="lm", epochs=8, batch_size=10, lr=lr, context_demos=4, calibrate=False), mode, seed=1)
    assert a.loss_after < a.loss_before - 0.1, (a.loss_before, a.loss_after)
    assert len(a.losses) == 8 and set(a.params) == set(lm.lora_names if mode == "lora" else lm.full_names)
    # the loaded module is never mutated: every task's weights are overrides
    assert all(torch.equal(before[k], v) for k, v in lm.params("full").items())


def test_full_adaptation_learns_the_labels(lm):
    """Enough full steps on the tiny model make it answer its own demonstrations correctly."""
    task = sentiment_task()
    queries = task.demonstrations
    shown = task.model_copy(update={"demonstrations": queries[:2]})  # the context it was trained with
    a = adapt(lm, task, Recipe(loss="lm", epochs=32, batch_size=8, lr=1e-2, context_demos=2, calibrate=False), "full")
    right = lambda preds: sum(p.output == q.output for p, q in zip(preds, queries))  # noqa: E731
    assert right(predict(lm, shown, queries)) <= 6  # the random model is at chance
    assert right(predict(lm, shown, queries, params=a.params)) >= 9


def test_option_loss_is_cross_entropy_over_the_option_scores(lm):
    """The loss is exactly what prediction ranks by: -log softmax of the gold option's score."""
    task = sentiment_task()
    fmt = Formatter(lm.encode)
    q = task.demonstrations[0]
    episode = [(task.demonstrations[1:3], q)]
    shown = task.model_copy(update={"demonstrations": task.demonstrations[1:3]})
    (pred,) = predict(lm, shown, [q], fmt=fmt)
    scores = torch.tensor([pred.scores[o] for o in task.options])
    expected = -(scores[task.options.index(q.output)] - scores.logsumexp(0))
    got = option_loss(lm, None, fmt, None, episode, task.options)
    assert got.item() == pytest.approx(expected.item(), abs=1e-4)


def test_option_loss_makes_the_gold_option_win(lm):
    """A few epochs of the option loss on a task the random model is at chance on: every
    demonstration's gold option wins afterwards, with no demonstration in context."""
    task = sentiment_task()
    recipe = Recipe(loss="options", epochs=30, batch_size=10, lr=3e-2, context_demos=0, predict_demos=0, calibrate=False)
    a = adapt(lm, task, recipe, "lora", seed=0)
    assert a.loss_after < a.loss_before / 2, (a.loss_before, a.loss_after)
    right = lambda preds: sum(p.output == d.output for p, d in zip(preds, task.demonstrations))  # noqa: E731
    assert right(predict(lm, task, task.demonstrations, recipe=recipe)) <= 7
    assert right(predict(lm, task, task.demonstrations, params=a.params, recipe=recipe)) == 10


def test_a_task_with_one_demonstration_per_label_adapts(lm):
    task = sentiment_task().model_copy(update={"demonstrations": [sentiment_task().demonstrations[i] for i in (0, 5)]})
    a = adapt(lm, task, Recipe(epochs=4, lr=3e-2, min_demos=0), "lora")
    assert a.losses and a.loss_after < a.loss_before and set(a.prior) == set(task.options)


@pytest.mark.parametrize("loss", ["lm", "options", "mix"])
def test_losses_before_and_after_are_the_first_batch_in_the_prediction_prompt(lm, loss):
    """Training in the prompt, adapt reports its losses without passes of its own: they must be
    exactly the recipe's loss on the first step's queries at the start and at the end."""
    from model.adapt import prompt_of
    from model.losses import episode_loss

    task = sentiment_task()
    recipe = Recipe(loss=loss, epochs=2, batch_size=4, lr=3e-2)
    a = adapt(lm, task, recipe, "lora", seed=3)
    (first, *_) = support_episodes(task.demonstrations, recipe.steps_for(10), 4, 0, random.Random(3))
    fixed, init = start_params(lm, "lora", None, 3)
    fmt = Formatter(lm.encode)
    with torch.no_grad():
        at = lambda p: episode_loss(lm, p, fmt, task.instruction, first, task.options, loss,  # noqa: E731
                                    prompt=prompt_of(task, recipe)).item()
        assert a.loss_before == pytest.approx(at(init), abs=1e-5)
        assert a.loss_after == pytest.approx(at(a.params), abs=1e-5)
    assert a.loss_after != a.loss_before  # it trained


def test_support_episodes_cover_every_demonstration_and_never_leak_the_query():
    demos = sentiment_task().demonstrations
    eps = support_episodes(demos, steps=5, batch_size=4, context_demos=3, rng=random.Random(0))
    queries = [q for ep in eps for _, q in ep]
    assert {q.input for q in queries[:10]} == {d.input for d in demos}  # a full cycle first
    for ep in eps:
        for ctx, q in ep:
            assert q not in ctx and len(ctx) == 3


def test_adam_update_matches_torch_adam():
    p = torch.randn(5, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.1, eps=1e-8)
    ours, state = {"p": p.detach().clone()}, AdamState()
    for _ in range(3):
        g = torch.randn(5)
        p.grad = g.clone()
        opt.step()
        ours, state = adam_update(ours, {"p": g}, state, 0.1)
    assert torch.allclose(ours["p"], p.detach(), atol=1e-6)


def meta_grad(lm, order: int):
    task = sentiment_task()
    fmt = Formatter(lm.encode)
    fixed, lora = start_params(lm, "lora", seed=0)
    g = torch.Generator().manual_seed(0)
    # B starts at zero, which gives A no gradient in the first step: perturb it
    init = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).requires_grad_() for k, v in lora.items()}
    eps = support_episodes(task.demonstrations[:6], 2, 3, 2, random.Random(0))
    adapted, _, _ = inner_loop(lm, fixed, dict(init), fmt, None, eps, 1e-2, order=order)
    query = [(task.demonstrations[:2], task.demonstrations[7])]
    loss = icl_loss(lm, adapted, fmt, None, query)
    grads = torch.autograd.grad(loss, list(init.values()))
    return torch.cat([x.flatten() for x in grads]), adapted, query, fmt


def test_second_order_meta_gradient_differs_from_first_order(lm):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        g1, adapted, query, fmt = meta_grad(lm, order=1)
        g2, _, _, _ = meta_grad(lm, order=2)
    assert torch.isfinite(g2).all() and g1.norm() > 0
    rel = ((g2 - g1).norm() / g1.norm()).item()
    assert rel > 1e-3, rel
    # first order: the meta-gradient is exactly the query gradient at the adapted parameters
    leaves = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    direct = torch.autograd.grad(icl_loss(lm, leaves, fmt, None, query), list(leaves.values()))
    assert torch.allclose(g1, torch.cat([x.flatten() for x in direct]), atol=1e-6)


def test_frozen_lower_layers_replayed_give_the_full_models_loss_and_gradients(monkeypatch):
    """LoRA on the top layer only: after a step has recorded what the frozen layer below makes of
    the prompt and the rows, later steps run only the top layer, with exactly the same numbers."""
    from model.lm import LoraSpec
    from model.prefix import Lower

    top = tiny_lm(lora=LoraSpec(layers=(-1,)))
    task = sentiment_task().model_copy(update={"options": ["positive", "negative", "neutral sports"]})
    fmt = Formatter(top.encode)
    g = torch.Generator().manual_seed(0)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in top.lora_init(0).items()}
    episode = [(None, d) for d in task.demonstrations[:4]]

    def loss_and_grads(lower):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss = option_loss(top, p, fmt, "Is it good?", episode, task.options, lm_weight=0.5, prompt=task.demonstrations,
                           lower=lower)
        return loss, torch.autograd.grad(loss, list(p.values()))

    full, full_grads = loss_and_grads(None)
    lower = Lower(1)
    loss_and_grads(lower)  # records
    replayed, grads = loss_and_grads(lower)
    assert lower.replay and len(lower.h) > 1
    assert replayed.item() == pytest.approx(full.item(), abs=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, full_grads))
    # and a whole adaptation in the prompt lands where one without the replay lands
    recipe = Recipe(epochs=4, batch_size=4, lr=1e-2, context_demos=None, predict_demos=None, calibrate=False)
    fast = adapt(top, task, recipe, "lora")
    monkeypatch.setattr("model.adapt.frozen_below", lambda lm, mode: None)
    slow = adapt(top, task, recipe, "lora")
    assert all(torch.allclose(fast.params[k], slow.params[k], atol=1e-5) for k in fast.params)
