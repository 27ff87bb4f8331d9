"""Meta-training on the tiny model and the synthetic task family (no bank, nothing downloaded)."""

from __future__ import annotations

import json
import random
from typing import get_args

import pytest
import torch
from pydantic import ValidationError

from model import checkpoints
from model.losses import episode_loss
from model.meta_train import (
    METHODS,
    MetaTrainConfig,
    MetaTrainer,
    grad_checkpointing,
    meta_train,
    synthetic_source,
    training_mode,
)
from model.optim import AdamState
from model.recipe import DEFAULT
from tests.helpers import tiny_lm

FAST = dict(setting="synthetic", support_size=6, support_batch=3, query_size=3, context_demos=3, context_tokens=128,
            tasks_per_step=2, log_every=2)


@pytest.fixture(scope="module")
def lm():
    return tiny_lm()


@pytest.fixture(scope="module")
def source():
    return synthetic_source()


def cfg(tmp_path, **kw) -> MetaTrainConfig:
    return MetaTrainConfig(**{**FAST, "data_dir": tmp_path, **kw})


def test_meta_training_lowers_post_adaptation_query_loss(lm, source, tmp_path):
    # held-out tasks of the family, fixed episodes: the loss after test-time adaptation from θ
    # (full space: LoRA on q/v of a random 2-layer model barely moves its output distribution)
    c = cfg(tmp_path, method="maml", space="full", steps=8, inner_steps=2, inner_lr=1e-3, outer_lr=3e-3, tasks_per_step=3)
    tr = MetaTrainer(c, lm, source)
    before = tr.held_out_loss(n_tasks=3)
    for _ in range(c.steps):
        m = tr.step()
        assert torch.isfinite(torch.tensor(m["query_loss"]))
    after = tr.held_out_loss(n_tasks=3)
    assert after["adapted"] < before["adapted"] - 0.5, (before, after)
    assert after["icl"] < before["icl"] - 0.5


@pytest.mark.parametrize("method,space", [("fomaml", "full"), ("reptile", "full"), ("metaicl", "full"), ("maml", "lora")])
def test_other_methods_lower_query_loss(lm, source, tmp_path, method, space):
    lrs = dict(inner_lr=1e-3, outer_lr=3e-3) if space == "full" else dict(inner_lr=1e-2, outer_lr=3e-2)
    c = cfg(tmp_path, method=method, space=space, steps=6, **lrs)
    tr = MetaTrainer(c, lm, source)
    before = tr.held_out_loss(n_tasks=2)
    for _ in range(c.steps):
        tr.step()
    after = tr.held_out_loss(n_tasks=2)
    assert after["icl"] < before["icl"], (before, after)
    if space == "full":
        assert after["adapted"] < before["adapted"], (before, after)


def test_shared_and_separate_moments_both_run_and_differ(lm, source, tmp_path):
    out = {}
    for shared in (True, False):
        tr = MetaTrainer(cfg(tmp_path, shared_moments=shared, inner_lr=1e-2, outer_lr=1e-2), lm, source)
        for _ in range(3):
            m = tr.step(track_before=True)
            assert m["query_loss_before"] is not None and m["support_loss"] is not None
        assert tr.state.t == 3
        out[shared] = tr.params
    diff = max((out[True][k] - out[False][k]).abs().max().item() for k in out[True])
    assert diff > 1e-6  # identical at step 1 (the shared state is still empty), apart after it
    assert all(torch.isfinite(v).all() for p in out.values() for v in p.values())


def _meta_grad(lm, source, tmp_path, order_method: str, space: str = "lora", ckpt: bool = False,
               context: str = "sampled") -> torch.Tensor:
    c = cfg(tmp_path, method=order_method, space=space, inner_steps=2, inner_lr=1e-2 if space == "lora" else 1e-3,
            inner_context=context)
    tr = MetaTrainer(c, lm, source)
    g = torch.Generator().manual_seed(0)
    theta = {k: (p + 0.05 * torch.randn(p.shape, generator=g) if ".lora_B." in k else p).requires_grad_()
             for k, p in tr.params.items()}  # B != 0: LoRA's A gets inner gradients from the first step
    with training_mode(lm, c.order, False), grad_checkpointing(lm, ckpt):
        r = tr.task_step(source.meta_train[0], theta, random.Random(7), False)
    return torch.cat([r.grads[k].flatten() for k in theta])


@pytest.mark.parametrize("space", ["lora", "full"])
def test_second_order_meta_gradient_differs_from_first_order(lm, source, tmp_path, space):
    g2 = _meta_grad(lm, source, tmp_path, "maml", space)
    g1 = _meta_grad(lm, source, tmp_path, "fomaml", space)
    assert torch.isfinite(g2).all() and g2.norm() > 0
    assert ((g2 - g1).norm() / g1.norm()).item() > 1e-3


def test_second_order_steps_are_not_swamped_by_zero_gradients(lm, source, tmp_path):
    """At the first outer step LoRA's B is 0, so A's inner gradient is exactly 0; differentiating
    Adam's g/sqrt(g^2 + eps^2) there gave 1/eps-sized terms (meta-gradient norm ~1e5 vs ~1).
    (With separate moments every inner loop starts from a fresh, sign-like Adam step whose true
    derivative still spikes for near-zero gradients: norms 10-20 vs <1 here. Shared moments, the
    default, carry v from the outer steps and keep it bounded.)"""
    norms = {}
    for method in ("maml", "fomaml"):
        tr = MetaTrainer(cfg(tmp_path, method=method, inner_steps=2, inner_lr=1e-2), lm, source)
        norms[method] = [tr.step()["grad_norm"] for _ in range(4)]
    assert all(n < 10 * max(norms["fomaml"]) for n in norms["maml"]), norms


@pytest.mark.parametrize("method,space", [("maml", "lora"), ("maml", "full"), ("fomaml", "lora"), ("reptile", "lora"),
                                          ("reptile", "full"), ("metaicl", "lora")])
def test_batched_tasks_give_the_task_by_task_meta_gradient(lm, source, tmp_path, method, space):
    """vmap over the step's tasks: the same draws, losses and meta-gradient as the loop."""
    c = cfg(tmp_path, method=method, space=space, tasks_per_step=3, inner_steps=2, inner_lr=1e-2, inner_context="sampled")
    tr = MetaTrainer(c, lm, source)
    g = torch.Generator().manual_seed(3)
    tr.params = {k: (p + 0.05 * torch.randn(p.shape, generator=g) if ".lora_B." in k else p) for k, p in tr.params.items()}
    tasks = source.meta_train[:3]
    with training_mode(lm, c.order, False, batched=True):
        batched, res_b = tr.batched_step(tasks, random.Random(5), track_before=True)
        theta = {k: p.detach().requires_grad_() for k, p in tr.params.items()}
        rng = random.Random(5)
        res_l = [tr.task_step(t, theta, rng, track_before=True) for t in tasks]
    loop = {k: sum(r.grads[k] for r in res_l) / len(tasks) for k in theta}
    for a, b in zip(res_b, res_l):
        assert a.tokens == b.tokens
        for x, y in [(a.query_after, b.query_after), (a.query_before, b.query_before), (a.support_loss, b.support_loss)]:
            assert (x is None) == (y is None) and (x is None or abs(x - y) < 1e-4)
    flat = lambda d: torch.cat([d[k].flatten() for k in theta])  # noqa: E731
    assert flat(loop).norm() > 0
    # float rounding only (second order through Adam amplifies it elementwise: compare as vectors)
    assert ((flat(batched) - flat(loop)).norm() / flat(loop).norm()).item() < 1e-4


def test_batched_tasks_refuse_gradient_checkpointing(tmp_path):
    with pytest.raises(ValueError, match="batch_tasks and grad_checkpointing"):
        cfg(tmp_path, batch_tasks=True, grad_checkpointing=True, inner_context="sampled")


def test_configs_that_cannot_run_are_refused(tmp_path):
    with pytest.raises(ValidationError, match="batch_tasks needs inner_context 'sampled'"):
        cfg(tmp_path, batch_tasks=True)  # the default context is the recipe's prediction prompt
    with pytest.raises(ValidationError, match="reptile cannot share Adam moments"):
        cfg(tmp_path, method="reptile", shared_moments=True)
    assert cfg(tmp_path, batch_tasks=True, inner_context="sampled").batch_tasks
    assert not cfg(tmp_path, method="reptile").shared and cfg(tmp_path, method="fomaml").shared


def test_methods_are_listed_alike_everywhere():
    from app.schemas import MetaTrainRequest

    assert get_args(MetaTrainConfig.model_fields["method"].annotation) == METHODS
    assert get_args(MetaTrainRequest.model_fields["method"].annotation) == METHODS
    assert MetaTrainConfig().inner_context == "recipe"  # new runs train as test time adapts


@pytest.mark.parametrize("context", ["sampled", "recipe"])
def test_gradient_checkpointing_gives_the_same_second_order_gradient(lm, source, tmp_path, context):
    # "recipe": the prompt's KV cache is appended to in the forward; the recomputation replays it as it was
    plain = _meta_grad(lm, source, tmp_path, "maml", "lora", context=context)
    ckpt = _meta_grad(lm, source, tmp_path, "maml", "lora", ckpt=True, context=context)
    torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-7)
    # the patch is undone on exit: layers run their class's forward again
    assert all("forward" not in vars(m) for m in lm.model.modules())


@pytest.mark.parametrize("method", ["maml", "reptile"])
def test_resume_reproduces_the_uninterrupted_run(lm, source, tmp_path, method):
    kw = dict(method=method, steps=4, inner_lr=1e-2, outer_lr=1e-2)
    straight = meta_train(cfg(tmp_path, **kw), lm=lm, source=source)
    half = meta_train(cfg(tmp_path, **{**kw, "steps": 2}), lm=lm, source=source)
    resumed = meta_train(cfg(tmp_path, **kw, resume=half), lm=lm, source=source)
    p1, s1, m1 = checkpoints.load(tmp_path, straight)
    p2, s2, m2 = checkpoints.load(tmp_path, resumed)
    assert m2["parent"] == half and m2["step"] == m1["step"] == 4 and s1.t == s2.t == 4
    for a, b in [(p1, p2), (s1.m, s2.m), (s1.v, s2.v)]:
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_trainer_keeps_the_model_s_parameter_order_whatever_it_is_given(lm, source, tmp_path):
    # a checkpoint hands its tensors out in another order than the model's; a step sums over them
    # (the meta-gradient's norm), so a resumed trainer must add in a fresh one's order to stay bit-exact
    c = cfg(tmp_path, method="fomaml", steps=2)
    fresh = MetaTrainer(c, lm, source)
    fresh.step()
    st = fresh.state
    again = MetaTrainer(c, lm, source, dict(reversed(fresh.params.items())),
                        AdamState(dict(reversed(st.m.items())), dict(reversed(st.v.items())), st.t, st.betas, st.eps), 1)
    assert list(again.params) == list(fresh.params) == lm.lora_names
    assert list(again.state.m) == list(again.state.v) == lm.lora_names
    assert fresh.step()["grad_norm"] == again.step()["grad_norm"]
    assert all(torch.equal(fresh.params[k], again.params[k]) for k in fresh.params)


def test_progress_and_should_stop(lm, source, tmp_path):
    seen = []
    ckpt = meta_train(cfg(tmp_path, method="fomaml", steps=10), lm=lm, source=source,
                      progress=lambda s, t, m: seen.append((s, t, m["query_loss"])), should_stop=lambda: len(seen) >= 3)
    meta = checkpoints.read_meta(tmp_path, ckpt)
    assert [s for s, _, _ in seen] == [1, 2, 3] and all(t == 10 for _, t, _ in seen)
    assert meta["status"] == "stopped" and meta["step"] == 3
    assert meta["history"] and "query_loss" in meta["history"][0]


def test_checkpoint_metadata_and_registry(lm, source, tmp_path):
    a = meta_train(cfg(tmp_path, method="metaicl", steps=1), lm=lm, source=source)
    b = meta_train(cfg(tmp_path, method="maml", space="full", steps=1, inner_lr=1e-3, outer_lr=1e-4), lm=lm, source=source)
    listed = checkpoints.list_checkpoints(tmp_path)
    assert [m["id"] for m in listed] == [a, b] and a.startswith("v0001-metaicl-lora") and b.startswith("v0002-maml-full")
    params, state, meta = checkpoints.load(tmp_path, b)
    assert set(params) == set(lm.full_names) and set(state.m) == set(params) and isinstance(state, AdamState)
    assert meta["base_model"] == {"name": "tiny", "sha256": lm.sha256}
    assert meta["meta_train_tasks"] == sorted(t.name for t in source.meta_train) and len(meta["setting_sha256"]) == 64
    assert meta["hyperparameters"]["inner_lr"] == 1e-3 and meta["shared_moments"] is True and meta["order"] == 2
    assert checkpoints.read_meta(tmp_path, a)["shared_moments"] is False
    checkpoints.check_compatible(meta, lm)
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.check_compatible({**meta, "base_model": {"name": "x", "sha256": "0" * 64}}, lm)
    lora_meta = checkpoints.read_meta(tmp_path, a)
    assert lora_meta["lora"]["layers"] == list(range(lm.n_layers))
    checkpoints.check_compatible(lora_meta, lm)
    old = {**lora_meta, "lora": {k: v for k, v in lora_meta["lora"].items() if k != "layers"}}
    checkpoints.check_compatible(old, lm)  # from before the field: every layer, as this model
    with pytest.raises(checkpoints.CheckpointError, match="in layers"):  # a LoRA on other layers than the model's
        checkpoints.check_compatible({**lora_meta, "lora": {**lora_meta["lora"], "layers": [lm.n_layers - 1]}}, lm)
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.read_meta(tmp_path, "../../etc")
    with pytest.raises(ValueError):  # resuming into another method
        meta_train(cfg(tmp_path, method="fomaml", steps=2, resume=a), lm=lm, source=source)


# --------------------------------------------------------------------------- reptile
@pytest.mark.parametrize("space", ["lora", "full"])
@pytest.mark.parametrize("context", ["recipe", "sampled"])
def test_reptile_moves_theta_toward_the_adapted_weights(lm, source, tmp_path, space, context):
    """One outer step with one task: θ_new - θ points along θ' - θ (Adam's first step from empty
    moments is ~lr·sign of the pseudo-gradient, so elementwise, wherever θ' moved)."""
    c = cfg(tmp_path, method="reptile", space=space, tasks_per_step=1, inner_steps=2, max_grad_norm=None,
            inner_lr=1e-2 if space == "lora" else 1e-3, outer_lr=1e-3, inner_context=context)
    tr = MetaTrainer(c, lm, source)
    theta = {k: p.clone() for k, p in tr.params.items()}
    rng = tr.rng(0)  # the step's own draws
    task = tr.tasks[rng.randrange(len(tr.tasks))]
    with training_mode(lm, c.order, False):
        r = tr.task_step(task, {k: p.requires_grad_() for k, p in dict(theta).items()}, rng, False)
    toward = torch.cat([-r.grads[k].flatten() for k in theta])  # θ' - θ
    m = tr.step()
    moved = torch.cat([(tr.params[k] - theta[k]).flatten() for k in theta])
    assert toward.norm() > 0 and m["query_loss"] == r.query_after and m["support_loss"] == r.support_loss
    assert torch.dot(moved, toward) > 0
    nz = toward != 0
    assert torch.equal(torch.sign(moved[nz]), torch.sign(toward[nz])) and not moved[~nz].any()


def test_reptile_lowers_the_meta_train_query_loss(lm, source, tmp_path):
    # the same fixed tasks and episodes before and after (the step-0 draws), full space
    c = cfg(tmp_path, method="reptile", space="full", steps=6, inner_steps=3, inner_lr=1e-3, outer_lr=3e-3)
    tr = MetaTrainer(c, lm, source)

    def query_loss() -> float:
        rng = tr.rng(0)
        with torch.no_grad():
            return sum(tr.query_loss(t, tr.params, tr.draw(t, rng)).item() for t in tr.tasks[:4]) / 4

    before = query_loss()
    for _ in range(c.steps):
        tr.step()
    assert query_loss() < before - 0.1


# --------------------------------------------------------------------------- inner context
@pytest.mark.parametrize("method", ["maml", "fomaml", "reptile", "metaicl"])
def test_the_recipe_context_is_the_test_time_inner_loop(lm, source, tmp_path, method):
    """inner_context "recipe": the support loss the inner loop reports is the recipe's
    `episode_loss` at θ on the first support batch trained in the prediction prompt (the
    support set), and the query loss is scored in that same prompt; the meta-gradient is real."""
    c = cfg(tmp_path, method=method, inner_steps=2, inner_lr=1e-2)
    assert c.inner_context == "recipe"
    tr = MetaTrainer(c, lm, source)
    g = torch.Generator().manual_seed(0)
    theta = {k: (p + 0.05 * torch.randn(p.shape, generator=g) if ".lora_B." in k else p).requires_grad_()
             for k, p in tr.params.items()}  # B != 0, so that A gets gradients too
    task = source.meta_train[0]
    with training_mode(lm, c.order, False):
        r = tr.task_step(task, theta, random.Random(7), track_before=True)
        d = tr.draw(task, random.Random(7))
        with torch.no_grad():
            in_prompt = dict(options=task.options, loss=DEFAULT.loss, length_norm=DEFAULT.length_norm, prompt=d.support)
            query = episode_loss(lm, theta, tr.fmt, task.instruction, d.query, **in_prompt).item()
            first = (episode_loss(lm, theta, tr.fmt, task.instruction, d.episodes[0], **in_prompt,
                                  prompt_grad=DEFAULT.prompt_grad).item() if d.episodes else None)
    # every training query is a support example (its own copy masked there), with no context of its own
    assert all(ctx == [] and any(q is s for s in d.support) for ep in d.episodes for ctx, q in ep)
    assert all(ctx == [] for ctx, _ in d.query) and len(d.episodes) == (0 if method == "metaicl" else 2)
    assert r.query_before == pytest.approx(query, abs=1e-6)
    if method != "metaicl":
        assert r.support_loss == pytest.approx(first, abs=1e-6)
        assert r.query_after < r.query_before  # two inner steps on this task's support set
    flat = torch.cat([r.grads[k].flatten() for k in theta])
    assert torch.isfinite(flat).all() and flat.norm() > 0


@pytest.mark.parametrize("space", ["lora", "full"])
def test_second_order_through_the_prompt_differs_from_first_order(lm, source, tmp_path, space):
    g2 = _meta_grad(lm, source, tmp_path, "maml", space, context="recipe")
    g1 = _meta_grad(lm, source, tmp_path, "fomaml", space, context="recipe")
    assert torch.isfinite(g2).all() and g2.norm() > 0
    assert ((g2 - g1).norm() / g1.norm()).item() > 1e-3


def test_a_checkpoint_from_before_inner_context_resumes_with_sampled_contexts(lm, source, tmp_path):
    kw = dict(method="fomaml", steps=4, inner_lr=1e-2, outer_lr=1e-2)
    straight = meta_train(cfg(tmp_path, **kw, inner_context="sampled"), lm=lm, source=source)
    half = meta_train(cfg(tmp_path, **{**kw, "steps": 2}, inner_context="sampled"), lm=lm, source=source)
    path = tmp_path / "checkpoints" / half / "meta.json"  # written as runs before the field wrote it
    meta = json.loads(path.read_text())
    del meta["config"]["inner_context"], meta["hyperparameters"]["inner_context"]
    path.write_text(json.dumps(meta))

    with pytest.raises(ValueError, match="inner_context 'sampled', not 'recipe'"):
        meta_train(cfg(tmp_path, **kw, inner_context="recipe", resume=half), lm=lm, source=source)
    resumed = meta_train(cfg(tmp_path, **kw, resume=half), lm=lm, source=source)  # no inner_context given
    assert checkpoints.read_meta(tmp_path, resumed)["config"]["inner_context"] == "sampled"
    p1, _, _ = checkpoints.load(tmp_path, straight)
    p2, _, _ = checkpoints.load(tmp_path, resumed)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)  # the old run, continued as it ran


def test_remapped_episodes_keep_the_mapping_and_hide_the_label_names(lm, source, tmp_path):
    """Symbol tuning: with remap=1 every classification episode replaces each option by one random
    symbol (all letters or all words), the same one in support and query, and drops the
    instruction; the loss is scored over the symbols. remap=0 draws exactly what a run without it did."""
    tr = MetaTrainer(cfg(tmp_path, method="metaicl", remap=1.0), lm, source)
    plain = MetaTrainer(cfg(tmp_path, method="metaicl"), lm, source)
    kinds = set()
    for i, task in enumerate(source.meta_train[:8]):
        d, orig = tr.draw(task, random.Random(i)), plain.draw(task, random.Random(i))
        assert d.instruction is None and len(d.options) == len(task.options)
        assert not set(d.options) & set(task.options)
        kinds.add(all(len(o) == 1 and o.isupper() for o in d.options))
        to = dict(zip(task.options, d.options))
        # the same examples in the same order (the remap coin aside), each label replaced by its symbol
        assert [e.input for e in d.support] == [e.input for e in orig.support]
        assert [to[e.output] for e in orig.support] == [e.output for e in d.support]
        assert [to[q.output] for _, q in orig.query] == [q.output for _, q in d.query]
        with training_mode(lm, None, False), torch.no_grad():
            assert torch.isfinite(tr.query_loss(task, tr.params, d))
    assert kinds == {True, False}  # letters in some episodes, words in others
    again = MetaTrainer(cfg(tmp_path, method="metaicl", remap=0.0), lm, source).draw(source.meta_train[0], random.Random(3))
    first = plain.draw(source.meta_train[0], random.Random(3))
    assert again.support == first.support and again.options == source.meta_train[0].options
