"""Trigger properties of the attack zoo on synthetic tensors (fast): each trigger does what its
paper says, the data-dependent hooks (bind, cross samples) behave, bad input is one clear error."""

import math

import pytest
import torch

from backdoorlab.attacks import ATTACKS, TrainingAttack, poison, poison_test
from backdoorlab.attacks import triggers
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet


def digits_like(n=40, k=4, size=16, seed=0) -> ImageSet:
    """Black images with a bright 'digit' blob in the middle (rows/cols 5..10), k classes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    x[:, :, 5:11, 5:11] = torch.randint(100, 256, (n, 1, 6, 6), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.arange(k).repeat_interleave(n // k), k, name="blobs")


# ----------------------------------------------------------------------------- blend
def test_blend_noise_is_the_convex_mix_with_a_fixed_key():
    a = ATTACKS.create("blend", alpha=0.1)
    x = torch.rand(3, 1, 10, 10)
    out = a.apply_trigger(x)
    k = a.key_image((1, 10, 10))
    assert torch.allclose(out, 0.9 * x + 0.1 * k, atol=1e-6)
    assert torch.equal(k, ATTACKS.create("blend", alpha=0.5).key_image((1, 10, 10)))  # same key_seed, same key
    assert not torch.equal(k, ATTACKS.create("blend", key_seed=1).key_image((1, 10, 10)))
    assert 0.3 < float(k.mean()) < 0.7 and float(k.std()) > 0.2  # uniform noise


def test_blend_add_is_seed_002s_form_and_alpha_test_is_used_at_test_time():
    a = ATTACKS.create("blend", key="kitty", alpha=0.1, combine="add", alpha_test=0.3)
    x = torch.rand(2, 3, 12, 12) * 0.5
    k = a.key_image((3, 12, 12))
    assert torch.allclose(a.apply_trigger(x), (x + 0.1 * k).clamp(0, 1), atol=1e-6)
    data = ImageSet((x * 255).round().to(torch.uint8), torch.tensor([0, 1]), 2)
    t = poison_test(data, a, target=0)  # the class-1 image, at alpha_test
    expected = (data.x[1:].float() / 255 + 0.3 * k).clamp(0, 1)
    assert torch.allclose(t.x.float() / 255, expected, atol=1 / 255 + 1e-6)


def test_kitty_key_is_a_picture_in_colour_and_grey():
    from backdoorlab.attacks.blend import kitty

    rgb, grey = kitty(3, 32, 32), kitty(1, 28, 28)
    assert rgb.shape == (3, 32, 32) and grey.shape == (1, 28, 28)
    assert float(rgb.min()) >= 0 and float(rgb.max()) <= 1
    colours = torch.unique(rgb.flatten(1).T, dim=0)
    assert len(colours) >= 5  # pink, black, white, yellow, red
    assert float((rgb[0] - rgb[2]).abs().max()) > 0.5  # not grey


def test_blend_target_sample_keys_come_from_the_target_class():
    x = torch.zeros(20, 1, 8, 8, dtype=torch.uint8)
    y = torch.arange(4).repeat_interleave(5)
    x[y == 3] = torch.arange(5, dtype=torch.uint8).mul(50).view(5, 1, 1, 1)  # class 3: flat images 0,50,...,200
    data = ImageSet(x, y, 4)
    a = ATTACKS.create("blend", key="target-sample", alpha=1.0, combine="add")
    p = poison(data, a, rate=1.0, target=3, generator=torch.Generator().manual_seed(0))
    stamped = p.x[p.is_poison]
    assert stamped.shape[0] == 15
    assert torch.all(stamped == stamped[:, :, :1, :1])  # each is one flat target image
    assert set(stamped[:, 0, 0, 0].tolist()) <= {0, 50, 100, 150, 200} and len(set(stamped[:, 0, 0, 0].tolist())) > 1
    t = poison_test(data, a, target=3)  # keys from the test set's own target images
    assert set(t.x[:, 0, 0, 0].tolist()) <= {0, 50, 100, 150, 200}
    with pytest.raises(BackdoorLabError, match="draws its keys from the data set"):
        a.apply_trigger(torch.zeros(1, 1, 8, 8))
    no_target = ImageSet(x[y != 3], y[y != 3], 4)
    with pytest.raises(BackdoorLabError, match="needs images of class 3"):
        poison_test(no_target, a, target=3)


def test_blend_image_key_is_resized_and_channels_checked(tmp_path):
    import numpy as np

    np.save(tmp_path / "grey.npy", np.full((5, 7), 255, dtype=np.uint8))
    np.save(tmp_path / "rgb.npy", np.full((4, 4, 3), 255, dtype=np.uint8))
    a = ATTACKS.create("blend", key="image", image=str(tmp_path / "grey.npy"), alpha=0.5)
    out = a.apply_trigger(torch.zeros(1, 3, 12, 12))  # grey key on colour data: every channel
    assert torch.allclose(out, torch.full_like(out, 0.5))
    b = ATTACKS.create("blend", key="image", image=str(tmp_path / "rgb.npy"))
    data = ImageSet(torch.zeros(4, 1, 6, 6, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), 2)
    with pytest.raises(BackdoorLabError, match="has 3 channels but the data has 1"):
        poison(data, b, rate=0.5, target=0)
    with pytest.raises(BackdoorLabError, match="needs attack.image"):
        ATTACKS.create("blend", key="image")


# ----------------------------------------------------------------------------- multiplicative
def test_multiplicative_doubles_and_clips():
    a = ATTACKS.create("multiplicative")
    x = torch.tensor([0.0, 0.2, 0.4, 0.6, 1.0]).view(1, 1, 1, 5)
    assert torch.allclose(a.apply_trigger(x), torch.tensor([0.0, 0.4, 0.8, 1.0, 1.0]).view(1, 1, 1, 5))


# ----------------------------------------------------------------------------- sig
def test_sig_signal_is_the_horizontal_sinusoid():
    a = ATTACKS.create("sig", delta=20 / 255, freq=6)
    v = a.signal(28, 28)
    j = torch.arange(28, dtype=torch.float32)
    assert torch.allclose(v[5], 20 / 255 * torch.sin(2 * math.pi * j * 6 / 28), atol=1e-6)
    assert torch.equal(v[0], v[27])  # constant down each column
    x = torch.full((1, 1, 28, 28), 0.5)
    assert torch.allclose(a.apply_trigger(x)[0, 0], 0.5 + v, atol=1e-6)


def test_sig_is_clean_label_and_stronger_at_test_time_when_asked():
    data = digits_like(n=40, k=4, size=28)
    a = ATTACKS.create("sig", delta=20 / 255, delta_test=40 / 255)
    p = poison(data, a, rate=0.5, target=1, mode="clean-label")
    assert torch.equal(p.y, data.y)  # no label changes
    assert torch.all(p.y[p.is_poison] == 1) and int(p.is_poison.sum()) == 5
    t = poison_test(data, a, target=1, mode="clean-label")
    assert torch.all(t.y_source != 1)
    bg = t.x[:, 0, 0, :].float() / 255  # background row: clip(0 + v) with delta_test
    assert float(bg.max()) == pytest.approx(40 / 255 * float(torch.sin(2 * math.pi * torch.arange(28) * 6 / 28).max()), abs=1 / 255)
    with pytest.raises(BackdoorLabError, match="supports modes clean-label"):
        poison(data, a, rate=0.1, target=1, mode="all-to-one")
    with pytest.raises(BackdoorLabError, match="freq"):
        poison(digits_like(size=12), a, rate=0.5, target=1, mode="clean-label")


# ----------------------------------------------------------------------------- random position
def test_random_position_patch_avoids_the_digit_and_moves():
    data = digits_like(n=64, size=16)
    a = ATTACKS.create("random-position", size=3, value=1.0)
    x = data.float_batch()
    out = a.apply_trigger(x, torch.Generator().manual_seed(0))
    added = (out - x).abs().sum(1)
    assert torch.all(added.flatten(1).gt(0).sum(1) == 9)  # the whole 3x3 patch, in every image
    assert float(added[:, 5:11, 5:11].sum()) == 0.0  # never on the digit
    # the patch sits on the blank background: its window was all zero before
    top, left = a.positions(x, torch.Generator().manual_seed(0))
    assert torch.all(triggers.window_means(x, 3)[torch.arange(64), top, left] == 0)
    assert len(set(zip(top.tolist(), left.tolist()))) > 20  # random places
    top2, left2 = a.positions(x, torch.Generator().manual_seed(0))
    assert torch.equal(top, top2) and torch.equal(left, left2)  # seeded


def test_random_position_picks_the_darkest_area_on_natural_images():
    g = torch.Generator().manual_seed(0)
    x = 0.5 + 0.5 * torch.rand(8, 3, 16, 16, generator=g)
    x[:, :, 10:14, 2:6] = 0.05  # one dark corner region
    a = ATTACKS.create("random-position", size=3, tolerance=0.01)
    top, left = a.positions(x, torch.Generator().manual_seed(1))
    assert torch.all((top >= 10) & (top <= 11) & (left >= 2) & (left <= 3))


# ----------------------------------------------------------------------------- wanet
def test_wanet_field_is_smooth_small_and_fixed():
    a = ATTACKS.create("wanet")  # k 4, s 0.5
    grid = a.grid(28, 28)
    ident = triggers.identity_grid(28, 28)
    shift_px = (grid - ident).abs() * 27 / 2  # normalised offset -> pixels
    assert grid.shape == (1, 28, 28, 2) and float(grid.abs().max()) <= 1.0
    assert 0.05 < float(shift_px.mean()) and float(shift_px.max()) < 1.5  # sub-pixel to ~1 pixel: imperceptible
    assert float((grid[:, 1:] - grid[:, :-1]).abs().max()) < 0.1  # smooth (k = 4 control points)
    assert torch.equal(grid, ATTACKS.create("wanet").grid(28, 28))
    assert not torch.equal(grid, ATTACKS.create("wanet", field_seed=1).grid(28, 28))
    x = torch.rand(2, 1, 28, 28)
    out = a.apply_trigger(x)
    assert 0 < float((out - x).abs().mean()) < 0.2
    assert torch.allclose(ATTACKS.create("wanet", s=1e-6).apply_trigger(x), x, atol=1e-4)  # s -> 0: identity


def test_wanet_noise_mode_adds_cross_samples_at_their_labels():
    data = digits_like(n=80, size=16)
    a = ATTACKS.create("wanet", k=4, s=2.0, cross_ratio=2.0)
    p = poison(data, a, rate=0.1, target=0, generator=torch.Generator().manual_seed(0))
    n_poison = int(p.is_poison.sum())
    changed = (p.x != data.x).flatten(1).any(1)
    cross = changed & ~p.is_poison
    assert n_poison == 6 and int(cross.sum()) == 12
    assert torch.equal(p.y[cross], data.y[cross])  # noise samples keep their labels
    # cross samples are warped with the field plus noise, not with the field alone
    warped = (a.apply_trigger(data.float_batch(cross)) * 255).round().to(torch.uint8)
    assert not torch.equal(warped, p.x[cross])


# ----------------------------------------------------------------------------- clean-label
def test_clean_label_pgd_stays_in_the_ball_and_keeps_labels():
    from backdoorlab.models import ModelSpec, build_model

    a = ATTACKS.create("clean-label", eps=8 / 255, steps=3)
    model = build_model(ModelSpec("cnn", 4, (1, 16, 16))).eval()
    x = torch.rand(6, 1, 16, 16)
    y = torch.zeros(6, dtype=torch.long)
    adv = a.perturb(model, x, y, torch.Generator().manual_seed(0))
    assert float((adv - x).abs().max()) <= 8 / 255 + 1e-6 and float(adv.min()) >= 0 and float(adv.max()) <= 1
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert float(loss(model(adv), y)) > float(loss(model(x), y))  # harder
    l2 = ATTACKS.create("clean-label", eps=0.5, norm="l2", steps=3).perturb(model, x, y, torch.Generator().manual_seed(0))
    assert float((l2 - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-4
    # the patch: a 3x3 checkerboard in the bottom-right corner; four corners when asked
    out = a.apply_trigger(torch.full((1, 1, 8, 8), 0.5))
    assert torch.equal(out[0, 0, 5:, 5:], triggers.chessboard(3, 3)) and float(out[0, 0, :5].sub(0.5).abs().sum()) == 0
    four = ATTACKS.create("clean-label", corners="four").apply_trigger(torch.full((1, 1, 8, 8), 0.5))
    assert int((four != 0.5).sum()) == 4 * 9  # every pixel of the four 3x3 checkerboards is black or white


def test_clean_label_needs_enough_target_samples_and_caches_its_surrogate():
    from backdoorlab.attacks import clean_label

    data = digits_like(n=40, k=4, size=16)
    a = ATTACKS.create("clean-label", surrogate_epochs=1, steps=2, min_poison=10)
    with pytest.raises(BackdoorLabError, match=r"only 5 target-class samples to poison \(class 1 has 10"):
        poison(data, a, rate=0.5, target=1, mode="clean-label")
    b = ATTACKS.create("clean-label", surrogate_epochs=1, steps=2, min_poison=2)
    p = poison(data, b, rate=0.5, target=1, mode="clean-label", generator=torch.Generator().manual_seed(0))
    assert torch.equal(p.y, data.y) and int(p.is_poison.sum()) == 5
    m1 = b.surrogate_for(data)
    assert any(m is m1 for m in clean_label._SURROGATES.values())  # trained once, reused
    assert b.surrogate_for(data) is m1
    # a surrogate_recipe trains it with other settings: another surrogate (same seed), not the cached one
    c = ATTACKS.create("clean-label", surrogate_epochs=1, steps=2, min_poison=2, surrogate_recipe={"batch_size": 8})
    m2 = c.surrogate_for(data)
    assert m2 is not m1 and not all(torch.equal(p1, p2) for p1, p2 in zip(m1.parameters(), m2.parameters()))
    # the test-time trigger is the patch alone (no perturbation)
    t = poison_test(data, b, target=1, mode="clean-label")
    assert torch.equal(t.x, (b.apply_trigger(data.float_batch(data.y != 1)) * 255).round().to(torch.uint8))


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name,params,match", [
    ("blend", {"alpha": 1.5}, r"attack.alpha: Input should be less than or equal to 1"),
    ("blend", {"alpha": -0.1}, r"attack.alpha: Input should be greater than or equal to 0"),
    ("sig", {"delta": -0.1}, r"attack.delta: Input should be greater than or equal to 0"),
    ("clean-label", {"eps": -0.1}, r"attack.eps: Input should be greater than or equal to 0"),
    ("clean-label", {"surrogate": "resnet1000"}, r"unknown model 'resnet1000'; known: .*cnn"),
    ("clean-label", {"surrogate_recipe": {"lr": 1.5}}, r"surrogate_recipe sets lr; give surrogate_lr instead"),
    ("clean-label", {"surrogate_recipe": {"lookahaed": True}},
     r"surrogate_recipe is not a valid train section \(lookahaed: Extra inputs are not permitted\)"),
    ("multiplicative", {"factor": 0}, r"attack.factor: Input should be greater than 0"),
    ("wanet", {"k": 1}, r"attack.k: Input should be greater than or equal to 2"),
    ("pruning-aware", {"trigger": {"name": 3}}, r"attack.trigger.name must name the data-poisoning attack"),
    ("blend", {"key": "image"}, r"^blend key 'image' needs attack.image \(a PNG/JPEG/.npy file\)$"),
    ("pruning-aware", {"trigger": {"name": "badnets", "sise": 3}}, r"attack.trigger.sise: unknown parameter"),
    ("pruning-aware", {"trigger": {"name": "input-aware"}}, r"training-time attack"),
    ("input-aware", {"mask_density": 0}, r"attack.mask_density: Input should be greater than 0"),
])
def test_bad_parameters_are_one_clear_error(name, params, match):
    with pytest.raises(BackdoorLabError, match=match):
        ATTACKS.build(name, params, where="attack")


def test_target_class_that_does_not_exist():
    data = digits_like()
    for name, mode in (("blend", "all-to-one"), ("sig", "clean-label"), ("wanet", "all-to-one")):
        with pytest.raises(BackdoorLabError, match=r"attack.target=7 is not a class of this data set \(0..3\)"):
            poison(data, ATTACKS.create(name), rate=0.1, target=7, mode=mode)
    ia = ATTACKS.create("input-aware")
    with pytest.raises(BackdoorLabError, match="not a class"):
        ia.check(data, rate=0.1, target=7, source=None, mode="all-to-one")
    with pytest.raises(BackdoorLabError, match="cannot be halved 3 times"):
        ATTACKS.create("input-aware", depth=3).check(ImageSet(torch.zeros(4, 1, 28, 28, dtype=torch.uint8),
                                                               torch.tensor([0, 1, 2, 3]), 4),
                                                      rate=0.1, target=0, source=None, mode="all-to-one")
    with pytest.raises(BackdoorLabError, match="training-time attack"):
        poison(data, ia, rate=0.1, target=0)


def test_training_attacks_are_registered_as_such():
    from backdoorlab.attacks import is_training_attack

    assert {n for n in ATTACKS.names() if is_training_attack(n)} == {"input-aware", "pruning-aware"}
    assert isinstance(ATTACKS.create("pruning-aware"), TrainingAttack)
    assert ATTACKS.create("pruning-aware", trigger={"name": "sig"}).modes == ("clean-label",)


def test_trigger_grid_is_a_png_of_three_rows():
    from backdoorlab.plots import trigger_grid

    x = torch.rand(4, 3, 16, 16)
    png = trigger_grid(x, (x + 0.1).clamp(0, 1), "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_input_aware_triggers_go_through_the_victims_flips(tiny, monkeypatch):
    """With ``augment_triggers`` the generator's triggered images are made before the run's augmentation,
    so the victim sees them flipped as well (a model with flip TTA otherwise loses the backdoor: docs/cifar10-full.md); the
    loader's side of it is tests/test_data.py::test_loader_transform_runs_before_or_after_the_flips."""
    import backdoorlab.train as T
    from backdoorlab.models import ModelSpec, build_model

    calls = []
    real = T.train

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "train", spy)
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", 3, tiny.shape, {"width": 4, "hidden": 16}))
    for augment in (True, False):
        attack = ATTACKS.create("input-aware", mask_epochs=1, width=4, depth=2, augment_triggers=augment)
        attack.train_victim(model, tiny, T.TrainConfig(epochs=1, batch_size=16, warmup=0, flip=True), rate=0.25,
                            target=2, seed=0)
        assert calls[-1]["transform_first"] is augment and calls[-1]["transform"] is not None
    assert ATTACKS.create("input-aware").augment_triggers is False  # triggers on the augmented batch by default
