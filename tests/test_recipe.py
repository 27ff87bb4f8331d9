"""The recipe: its schedule follows the demonstrations, its calibration arithmetic, its checks."""

import math

import pytest

from model.recipe import DEFAULT, ICL, LR, Recipe
from model.calibration import prior_of


@pytest.mark.parametrize("n,epochs,batch,steps", [
    (16, 8, 8, 16),   # 2 steps an epoch
    (4, 8, 8, 8),     # fewer demonstrations than a batch: one step an epoch
    (32, 8, 8, 32),
    (64, 2, 8, 16),
    (10, 1.5, 4, 4),  # ceil(1.5 * 10 / 4) = ceil(3.75)
    (16, 0, 8, 0),    # no training
])
def test_steps_are_epochs_over_the_demonstrations(n, epochs, batch, steps):
    r = Recipe(epochs=epochs, batch_size=batch, min_steps=0, min_demos=0)
    assert r.steps_for(n) == steps
    assert r.epochs_for(n) == pytest.approx(steps * min(batch, n) / n)


def test_fewer_demonstrations_than_min_demos_train_nothing():
    assert DEFAULT.steps_for(DEFAULT.min_demos - 1) == 0 and DEFAULT.epochs_for(DEFAULT.min_demos - 1) == 0
    assert DEFAULT.steps_for(DEFAULT.min_demos) == DEFAULT.but(min_demos=0).steps_for(DEFAULT.min_demos) > 0
    assert DEFAULT.but(min_demos=0).steps_for(4) == 8  # 8 epochs, one step each


def test_steps_are_clamped_and_pinnable():
    assert Recipe(epochs=100, batch_size=1, max_steps=50).steps_for(64) == 50
    assert Recipe(epochs=0.01, min_steps=3).steps_for(16) == 3
    assert Recipe(min_steps=7, max_steps=7).steps_for(64) == Recipe(min_steps=7, max_steps=7).steps_for(5) == 7


def test_lr_per_space_and_overrides():
    assert DEFAULT.lr_for("lora") == LR["lora"] and DEFAULT.lr_for("full") == LR["full"]
    assert DEFAULT.but(lr=0.01).lr_for("full") == 0.01
    with pytest.raises(ValueError, match="space"):
        DEFAULT.lr_for("none")


@pytest.mark.parametrize("bad", [dict(loss="hinge"), dict(batch_size=0), dict(epochs=-1), dict(predict_demos=-1),
                                 dict(min_steps=5, max_steps=4), dict(min_demos=-1)])
def test_contradictory_recipes_are_refused(bad):
    with pytest.raises(ValueError):
        Recipe(**bad)


def test_recipe_round_trips_through_its_dict():
    r = DEFAULT.but(epochs=3.5, predict_demos=None)
    assert Recipe(**r.to_dict()) == r
    assert ICL.epochs == 0 and ICL.predict_demos is None and not ICL.calibrate


def test_batch_calibration_prior_on_hand_made_scores():
    # two inputs; per input the softmax over (a, b): [0.8, 0.2] and [0.6, 0.4] -> mean [0.7, 0.3]
    scores = [{"a": math.log(0.8), "b": math.log(0.2)}, {"a": math.log(0.6) + 5, "b": math.log(0.4) + 5}]
    prior = prior_of(scores)
    assert prior["a"] == pytest.approx(math.log(0.7)) and prior["b"] == pytest.approx(math.log(0.3))
    # subtracting it flips the second input to b: 0.6/0.7 < 0.4/0.3
    second = {o: scores[1][o] - prior[o] for o in "ab"}
    assert max(second, key=second.get) == "b"
    assert prior_of([]) == {}
