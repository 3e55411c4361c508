"""Registry-driven conformance tests for every registered attack (data-poisoning and training-time),
plus BadNets specifics. A new attack is covered without editing this file: it runs with its
defaults unless ``CASES`` / ``TRAINING_CASES`` give it parameter sets (more variants, or faster)."""

import pytest
import torch

from backdoorlab.attacks import ATTACKS, TrainedVictim, TrainingAttack, is_training_attack, poison, poison_test
from backdoorlab.attacks.base import Attack
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import PoisonedSet


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one torch thread is much faster than several on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# parameter sets per data-poisoning attack for the conformance test (an attack not listed: its defaults)
CASES = {
    "badnets": [{}, {"shape": "ball", "size": 5}, {"shape": "chessboard", "value": 0.1}, {"shape": "checkerboard"},
                {"position": "random", "size": 2}, {"position": (1, 2), "size": 4, "value": 0.5}],
    "blend": [{}, {"key": "kitty", "alpha": 0.2}, {"key": "target-sample", "alpha": 0.1, "combine": "add"},
              {"key": "noise", "alpha": 0.3, "alpha_test": 0.5, "key_seed": 4}],
    "multiplicative": [{}, {"factor": 0.5}],
    "sig": [{"freq": 2}, {"delta": 30 / 255, "freq": 3, "delta_test": 40 / 255}],  # tiny is 12 wide: f < 6
    "clean-label": [{"surrogate_epochs": 1, "steps": 2, "min_poison": 1},
                    {"surrogate_epochs": 1, "steps": 2, "min_poison": 1, "norm": "l2", "eps": 0.5, "corners": "four",
                     "pattern": "square", "amplitude": 0.5}],
    "random-position": [{}, {"shape": "ball", "size": 4, "tolerance": 0.2}],
    "wanet": [{}, {"k": 3, "s": 2.0, "cross_ratio": 0.5}, {"cross_ratio": 0}],
}


def all_cases():
    for name in ATTACKS.names():
        if is_training_attack(name):
            continue
        for params in CASES.get(name, [{}]):
            yield pytest.param(name, params, id=f"{name}-{params}")


@pytest.mark.parametrize("name,params", list(all_cases()))
@pytest.mark.parametrize("mode", ["all-to-one", "source-specific", "all-to-all", "clean-label"])
def test_conformance(name, params, mode, tiny):
    attack = ATTACKS.create(name, **params)
    assert isinstance(attack, Attack)
    if mode not in attack.modes:
        pytest.skip(f"{name} does not support {mode}")
    source = 1 if mode == "source-specific" else None
    kw = dict(rate=0.25, target=2, source=source, mode=mode)
    p1 = poison(tiny, attack, generator=torch.Generator().manual_seed(3), **kw)
    p2 = poison(tiny, attack, generator=torch.Generator().manual_seed(3), **kw)
    # shape, dtype, determinism
    assert p1.x.shape == tiny.x.shape and p1.x.dtype == torch.uint8
    assert torch.equal(p1.x, p2.x) and torch.equal(p1.y, p2.y) and torch.equal(p1.is_poison, p2.is_poison)
    # the input is untouched, the output is a new set
    x0, y0 = tiny.x.clone(), tiny.y.clone()
    assert isinstance(p1, PoisonedSet) and p1.x is not tiny.x
    assert not torch.equal(p1.x, tiny.x) or params.get("value") == 0
    # exactly the requested number of eligible samples poisoned
    eligible = {"all-to-one": tiny.y != 2, "source-specific": tiny.y == 1,
                "all-to-all": torch.ones_like(tiny.y, dtype=torch.bool), "clean-label": tiny.y == 2}[mode]
    assert int(p1.is_poison.sum()) == round(0.25 * int(eligible.sum()))
    assert bool((p1.is_poison & ~eligible).sum() == 0)
    # ground truth consistent: y_source is the original label; only poisoned (and cross) samples change
    assert torch.equal(p1.y_source, tiny.y)
    changed = (p1.x != tiny.x).flatten(1).any(1)
    n_cross = int(attack.cross_ratio * int(p1.is_poison.sum()) + 0.5)  # round half up, as poison()
    assert int((changed & ~p1.is_poison).sum()) <= n_cross
    if n_cross == 0:
        assert torch.equal(p1.x[~p1.is_poison], tiny.x[~p1.is_poison])
    else:
        assert int((changed & ~p1.is_poison).sum()) >= n_cross // 2  # cross samples are warped too
    assert torch.equal(p1.y[~p1.is_poison], tiny.y[~p1.is_poison])
    expected = {"all-to-one": torch.full_like(tiny.y, 2), "source-specific": torch.full_like(tiny.y, 2),
                "all-to-all": (tiny.y + 1) % 3, "clean-label": tiny.y}[mode]
    assert torch.equal(p1.y[p1.is_poison], expected[p1.is_poison])
    # the trigger (as bound to the test set) keeps the value range and shape on float input, and does not modify it
    idx = torch.arange(8)
    stamp = attack.bind(tiny, idx, target=2, mode=mode, training=False, generator=torch.Generator().manual_seed(0))
    xf = tiny.float_batch(idx)
    before = xf.clone()
    out = stamp(xf, tiny.y[idx], torch.Generator().manual_seed(0))
    assert out.shape == xf.shape and out.dtype == xf.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(xf, before)
    # the triggered test set
    t = poison_test(tiny, attack, target=2, source=source, mode=mode)
    assert isinstance(t, PoisonedSet) and t.x.dtype == torch.uint8 and t.x.shape[1:] == tiny.x.shape[1:]
    assert bool(t.is_poison.all()) and len(t) == int((t.y_source >= 0).sum())
    assert torch.equal(tiny.x, x0) and torch.equal(tiny.y, y0)
    if mode == "source-specific":
        assert torch.all(t.y_source == 1)
    elif mode == "all-to-all":
        assert len(t) == len(tiny) and torch.equal(t.y, (t.y_source + 1) % 3)
    else:
        assert torch.all(t.y_source != 2) and torch.all(t.y == 2)



# ----------------------------------------------------------------------------- training-time attacks
# smaller than the defaults, for speed only (an attack not listed runs with its defaults)
TRAINING_CASES = {
    "input-aware": {"mask_epochs": 1, "width": 4},
    "pruning-aware": {"trigger": {"name": "badnets", "size": 2}},
}


def training_cases():
    for name in ATTACKS.names():
        if is_training_attack(name):
            yield pytest.param(name, TRAINING_CASES.get(name, {}), id=name)


@pytest.mark.parametrize("name,params", list(training_cases()))
def test_training_attack_conformance(name, params, tiny):
    """Every training-time attack trains the victim it is given (one epoch, tiny data) and returns a
    :class:`TrainedVictim` whose trigger keeps shape and range; its triggered test set is uint8 in
    the data's shape, labelled with the target; the clean training set it was given is untouched."""
    from backdoorlab.models import ModelSpec, build_model
    from backdoorlab.train import TrainConfig

    attack = ATTACKS.create(name, **params)
    assert isinstance(attack, TrainingAttack) and attack.modes and set(attack.modes) <= {
        "all-to-one", "source-specific", "all-to-all", "clean-label"}
    mode = "all-to-one" if "all-to-one" in attack.modes else attack.modes[0]
    source = 1 if mode == "source-specific" else None
    kw = dict(rate=0.25, target=2, source=source, mode=mode)
    attack.check(tiny, **kw)
    with pytest.raises(BackdoorLabError):
        attack.check(tiny, rate=0.25, target=7, source=None, mode=mode)  # not a class of the data
    x0, y0 = tiny.x.clone(), tiny.y.clone()
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", 3, tiny.shape, {"width": 4, "hidden": 16}))
    victim = attack.train_victim(model, tiny, TrainConfig(epochs=1, batch_size=16, warmup=0), seed=0, **kw)
    assert isinstance(victim, TrainedVictim) and isinstance(victim.model, torch.nn.Module)
    assert torch.equal(tiny.x, x0) and torch.equal(tiny.y, y0)
    victim.model.eval()
    xf = tiny.float_batch(slice(0, 8))
    before = xf.clone()
    with torch.no_grad():
        assert victim.model(xf).shape == (8, 3)
        out = victim.trigger(xf)
    assert out.shape == xf.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0 and torch.equal(xf, before)
    assert not torch.equal(out, xf), "the trigger changes nothing"
    t = victim.triggered_test(tiny, target=2, source=source, mode=mode)
    assert isinstance(t, PoisonedSet) and t.x.dtype == torch.uint8 and t.x.shape[1:] == tiny.x.shape[1:] and len(t)
    if mode != "all-to-all":
        assert torch.all(t.y == 2) and torch.all(t.y_source != 2)
    if victim.poisoned is not None:  # a fixed poisoned training set (pruning-aware)
        p = victim.poisoned
        assert isinstance(p, PoisonedSet) and p.x.dtype == torch.uint8 and p.x.shape == tiny.x.shape
        assert int(p.is_poison.sum()) == round(0.25 * int((tiny.y != 2).sum()))
        assert torch.equal(p.y_source, tiny.y)
    assert isinstance(victim.history, dict) and isinstance(victim.details, dict)

def test_pruning_aware_retrains_at_its_rate_with_the_decay_scaled(tiny, monkeypatch):
    """Step 3 retrains at ``retrain_lr``; a recipe's decoupled decay (a shrink per step sized for the
    recipe's rate) scales with it, as in ABL's unlearning, instead of staying at the recipe's size."""
    import backdoorlab.train as train_mod
    from backdoorlab.models import ModelSpec, build_model
    from backdoorlab.train import TrainConfig

    seen = []
    monkeypatch.setattr(train_mod, "train", lambda model, data, cfg, **kw: seen.append(cfg) or train_mod.History())
    attack = ATTACKS.create("pruning-aware", trigger={"name": "badnets", "size": 2}, retrain_lr=0.15, retrain_epochs=2)
    model = build_model(ModelSpec("cnn", 3, tiny.shape, {"width": 4, "hidden": 16}))
    recipe = TrainConfig(epochs=5, lr=1.5, weight_decay=0.002, decoupled_weight_decay=True, warmup=0)
    attack.train_victim(model, tiny, recipe, rate=0.25, target=2, seed=0)
    (c1, c3) = seen
    assert (c1.lr, c1.epochs, c1.weight_decay) == (1.5, 5, 0.002)
    assert (c3.lr, c3.epochs, c3.weight_decay) == (0.15, 2, pytest.approx(0.0002))


def test_square_patch_lands_in_the_corner():
    a = ATTACKS.create("badnets", size=2, value=1.0)
    x = torch.zeros(2, 1, 28, 28)
    out = a.apply_trigger(x)
    assert out[:, :, 26:, 26:].eq(1).all() and out.sum() == 2 * 4
    a = ATTACKS.create("badnets", size=3, position="top-left", margin=1, value=0.5)
    out = a.apply_trigger(torch.zeros(1, 3, 10, 10))
    assert out[0, :, 1:4, 1:4].eq(0.5).all() and out.sum() == pytest.approx(0.5 * 27)


def test_random_positions_differ_per_image_and_fit():
    a = ATTACKS.create("badnets", size=3, position="random")
    out = a.apply_trigger(torch.zeros(64, 1, 12, 12), torch.Generator().manual_seed(0))
    assert torch.all(out.sum((1, 2, 3)) == 9)  # whole patch inside every image
    where = out.flatten(1).argmax(1)
    assert where.unique().numel() > 10


def test_chessboard_is_global_and_additive():
    a = ATTACKS.create("badnets", shape="chessboard", value=0.1)
    x = torch.full((1, 1, 4, 4), 0.5)
    out = a.apply_trigger(x)
    assert torch.allclose(out[0, 0], 0.5 + 0.1 * torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]] * 2, dtype=torch.float))


def test_checkerboard_patch_is_local_and_shows_on_white_corners():
    a = ATTACKS.create("badnets", shape="checkerboard", size=3)
    x = torch.ones(2, 3, 6, 6)
    x[0] = 0.0  # a black image and a white one
    out = a.apply_trigger(x)
    board = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=torch.float)
    assert torch.equal(out[:, :, 3:, 3:], board.expand(2, 3, 3, 3))
    assert torch.equal(out[:, :, :3], x[:, :, :3]) and torch.equal(out[:, :, :, :3], x[:, :, :, :3])
    assert bool((out[1] != x[1]).any())  # unlike the white square, it changes a white corner


def test_image_trigger_resized(tmp_path):
    import numpy as np

    np.save(tmp_path / "t.npy", np.full((5, 5), 255, dtype=np.uint8))
    a = ATTACKS.create("badnets", shape="image", image=str(tmp_path / "t.npy"), size=3)
    out = a.apply_trigger(torch.zeros(1, 1, 8, 8))
    assert out[0, 0, 5:, 5:].eq(1).all() and out.sum() == 9
    with pytest.raises(BackdoorLabError, match="not found"):
        ATTACKS.create("badnets", shape="image", image=str(tmp_path / "missing.png"))


@pytest.mark.parametrize("kw,match", [
    (dict(rate=0.0), r"rate must lie in \(0, 1\]"),
    (dict(rate=1.5), r"rate must lie in \(0, 1\]"),
    (dict(target=7), "not a class"),
    (dict(mode="source-specific", source=None), "needs attack.source"),
    (dict(mode="source-specific", source=2), "both 2"),
    (dict(mode="sideways"), "unknown poisoning mode"),
])
def test_bad_threat_models(tiny, kw, match):
    args = dict(rate=0.1, target=2, source=None, mode="all-to-one") | kw
    with pytest.raises(BackdoorLabError, match=match):
        poison(tiny, ATTACKS.create("badnets"), **args)


def test_patch_too_large_and_empty_source(tiny):
    with pytest.raises(BackdoorLabError, match="does not fit"):
        poison(tiny, ATTACKS.create("badnets", size=13), rate=0.1, target=0)
    from backdoorlab.types import ImageSet

    no_ones = ImageSet(tiny.x[tiny.y != 1], tiny.y[tiny.y != 1], 3)
    with pytest.raises(BackdoorLabError, match="source class 1"):
        poison(no_ones, ATTACKS.create("badnets"), rate=0.1, target=0, source=1, mode="source-specific")
