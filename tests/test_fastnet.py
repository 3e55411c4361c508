"""fastnet (airbench94's net) and the training-recipe options of the trainer: whitening init, flip
TTA, parameter groups, decoupled weight decay, the linear schedule, lookahead, bf16 autocast with
its float32 fallback. Cheap: tiny sets and narrow widths."""

from __future__ import annotations

import os

import pytest
import torch

from backdoorlab.errors import BackdoorLabError
from backdoorlab.models import ModelSpec, build_model, load_model, save_model
from backdoorlab.train import (
    TrainConfig, autocast_dtype, bf16_autocast_supported, evaluate, lr_at, make_optimizer, train,
)
from backdoorlab.types import ImageSet

SMALL = {"widths": [8, 16, 16]}


def _colour_set(n: int = 160, seed: int = 0) -> ImageSet:
    """4 classes told apart by a coloured square's position, on noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 120, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.arange(n) % 4
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, k % 3, 16 * r:16 * r + 12, 16 * c:16 * c + 12] = 250
    return ImageSet(x, y, 4, name="colour")


def test_shapes_tta_and_round_trip(tmp_path):
    torch.manual_seed(0)
    for shape in ((3, 32, 32), (1, 28, 28)):
        m = build_model(ModelSpec("fastnet", 7, shape, SMALL)).eval()
        x = torch.rand(5, *shape)
        out = m(x)
        assert out.shape == (5, 7) and torch.isfinite(out).all()
        assert m.features(x).shape == (5, 16)
        # flip TTA: the eval-mode prediction of an image and of its mirror image are the same
        assert torch.allclose(m(x), m(x.flip(-1)), atol=1e-5)
        m.train()
        assert not torch.allclose(m(x), m(x.flip(-1)), atol=1e-3)
    m = build_model(ModelSpec("fastnet", 10, (3, 32, 32), SMALL))
    m.init_from_data(torch.rand(64, 3, 32, 32))
    m.eval()
    save_model(m, tmp_path / "f.safetensors")
    m2 = load_model(tmp_path / "f.safetensors", num_classes=10, input_shape=(3, 32, 32))
    x = torch.rand(4, 3, 32, 32)
    assert torch.allclose(m(x), m2(x), atol=1e-5)


def test_whitening_init_decorrelates_patches():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(300, 3, 8, 8, generator=g)
    x = torch.nn.functional.interpolate(base, size=(32, 32), mode="bilinear")  # strongly correlated pixels
    m = build_model(ModelSpec("fastnet", 10, (3, 32, 32), SMALL))
    m.init_from_data(x)
    w = m.whiten.weight
    assert w.shape == (24, 3, 2, 2) and torch.allclose(w[:12], -w[12:])
    z = torch.nn.functional.conv2d(m.norm(x), w[:12]).permute(1, 0, 2, 3).reshape(12, -1)
    z = z - z.mean(1, keepdim=True)
    cov = z @ z.T / z.shape[1]
    d = cov.diagonal()  # unit variance, but eps 5e-4 shrinks the directions of tiny variance (here to 0.84)
    assert d.max() < 1.02 and d.min() > 0.5 and (d > 0.95).sum() >= 8
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 0.05  # decorrelated (raw pixels: ~0.9)
    assert not m.whiten.weight.requires_grad and m.whiten.bias.requires_grad


def test_defaults_unchanged_and_recipe_options():
    cfg = TrainConfig()
    assert (cfg.schedule, cfg.decoupled_weight_decay, cfg.lookahead, cfg.autocast) == ("cosine", False, False, "off")
    plain = build_model(ModelSpec("cnn", 10, (1, 28, 28), {}))
    opt = make_optimizer(plain, cfg)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == cfg.weight_decay
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["lr"] == cfg.lr
    fast = build_model(ModelSpec("fastnet", 10, (3, 32, 32), SMALL))
    rc = TrainConfig(lr=1.5, weight_decay=0.002, decoupled_weight_decay=True, schedule="linear", warmup=2, epochs=10)
    groups = make_optimizer(fast, rc).param_groups
    assert sorted(g["lr_scale"] for g in groups) == [1.0, 64.0]
    for gr in groups:  # decoupled: the per-step shrink lr x wd is weight_decay in every group
        assert gr["lr"] * gr["weight_decay"] == pytest.approx(0.002)
    bn_biases = {id(m.bias) for m in fast.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in next(g for g in groups if g["lr_scale"] == 64.0)["params"]} == bn_biases
    plain_bias = build_model(ModelSpec("fastnet", 10, (3, 32, 32), {**SMALL, "bias_scale": 1.0}))
    assert sorted(g["lr_scale"] for g in make_optimizer(plain_bias, rc).param_groups) == [1.0, 1.0]
    with pytest.raises(BackdoorLabError, match="bias_scale must be > 0"):
        build_model(ModelSpec("fastnet", 10, (3, 32, 32), {**SMALL, "bias_scale": 0}))
    from backdoorlab.train import set_lr

    opt = make_optimizer(fast, rc)
    set_lr(opt, 0.01)  # what the trainer and ABL's unlearning loop call every step: the scale is kept
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx([0.01, 0.64])
    lrs = [lr_at(rc, s, 100, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.075) and max(lrs) == pytest.approx(1.5) and lrs[19] == pytest.approx(1.5)
    assert lrs[-1] < 0.02 and all(a >= b for a, b in zip(lrs[20:], lrs[21:]))


def test_at_lr_scales_a_decoupled_decay_with_the_rate():
    """A config at another rate (ABL's unlearning, pruning-aware's retraining): a decoupled decay is a
    per-step shrink sized for the config's own rate, so it scales with the new one; a coupled decay
    (already multiplied by the rate in SGD's step) is kept."""
    rc = TrainConfig(lr=1.5, weight_decay=0.002, decoupled_weight_decay=True, epochs=10)
    low = rc.at_lr(0.015, epochs=3)
    assert (low.lr, low.epochs, low.weight_decay) == (0.015, 3, pytest.approx(2e-5))
    assert rc.at_lr(0.015, weight_decay=0.1).weight_decay == 0.1  # an explicit decay wins
    plain = TrainConfig(lr=0.05, weight_decay=5e-4)
    assert plain.at_lr(0.005).weight_decay == 5e-4 and plain.at_lr(0.005).lr == 0.005
    assert rc.at_lr(rc.lr) == rc


def test_autocast_choice_and_fallback(monkeypatch):
    cpu = torch.device("cpu")
    assert autocast_dtype(TrainConfig(), cpu) is None
    assert autocast_dtype(TrainConfig(autocast="bf16"), cpu) is torch.bfloat16
    auto = TrainConfig(autocast="auto")
    assert autocast_dtype(auto, cpu) is (torch.bfloat16 if bf16_autocast_supported() else None)
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2" or os.environ.get("ATEN_CPU_CAPABILITY") == "avx2":
        assert not bf16_autocast_supported()  # bf16 would be emulated there: fp32 is chosen
    import backdoorlab.train as T

    monkeypatch.setattr(T, "bf16_autocast_supported", lambda: False)
    assert autocast_dtype(auto, cpu) is None


@pytest.mark.slow
@pytest.mark.parametrize("autocast", ["auto", "off"])
def test_recipe_trains(autocast):
    data = _colour_set()
    torch.manual_seed(0)
    m = build_model(ModelSpec("fastnet", 4, (3, 32, 32), SMALL))
    cfg = TrainConfig(epochs=6, batch_size=32, lr=0.3, momentum=0.85, weight_decay=0.002, decoupled_weight_decay=True,
                      schedule="linear", warmup=1, label_smoothing=0.2, crop_padding=2, flip=True, lookahead=True,
                      autocast=autocast)
    hist = train(m, data, cfg, seed=0)
    assert len(hist.epochs) == 6 and all(torch.isfinite(p).all() for p in m.parameters())
    assert m.whiten.weight.abs().sum() > 0  # initialised from the data
    assert evaluate(m, _colour_set(80, seed=1)) > 0.8  # chance is 0.25
    w = m.whiten.weight.clone()
    train(m, _colour_set(64, seed=2), cfg.model_copy(update={"epochs": 1}), seed=1)  # fine-tuning keeps the filters
    assert torch.equal(m.whiten.weight, w)
