"""Repairers pruning / fine-tuning / fine-pruning: mechanics on tiny models, bad input, and the
fine-pruning bar on a small BadNets MNIST victim."""

import itertools

import pytest
import torch
from torch import nn

from backdoorlab.evaluation import make_evaluator
from backdoorlab.defenses import DEFENSES, Repairer, RepairResult
from backdoorlab.defenses.pruning import PruneTarget, channel_activations
from backdoorlab.errors import BackdoorLabError
from backdoorlab.models import ModelSpec, build_model, load_model, save_model
from backdoorlab.train import TrainConfig, evaluate, predict_logits, train
from backdoorlab.types import ImageSet


@pytest.fixture(scope="module")
def small():
    """A cnn trained for 2 epochs on 240 synthetic 3-class 12x12 images whose class is a bright band."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(80)
    x = torch.randint(0, 60, (240, 1, 12, 12), generator=g, dtype=torch.uint8)
    for c in range(3):
        x[y == c, :, 4 * c:4 * c + 4, :] += 150
    data = ImageSet(x, y, 3, name="bands")
    model = build_model(ModelSpec("cnn", 3, (1, 12, 12), {"width": 8}))
    train(model, data, TrainConfig(epochs=2, batch_size=32), seed=0)
    return model, data


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_registered_with_family():
    for name in ("pruning", "fine-tuning", "fine-pruning"):
        assert isinstance(DEFENSES.create(name), Repairer)


def test_pruning_masks_most_dormant_channels_and_leaves_input_alone(small, tmp_path):
    model, data = small
    before = _state(model)
    res = DEFENSES.create("pruning", fraction=0.5).repair(model, data)
    assert isinstance(res, RepairResult)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the input model was modified"
    w, b = res.model.conv2.weight, res.model.conv2.bias
    zero = (w.flatten(1).abs().sum(1) == 0) & (b == 0)
    assert int(zero.sum()) == 8 == res.details["pruned"]  # 50% of 16 channels
    # the pruned channels are the 8 least active on the clean set (ties aside)
    act = channel_activations(model, PruneTarget(model, None), data)
    assert act[zero].max() <= act[~zero].min() + 1e-9
    # the curve: one row per step, pruned fraction rising, held-out accuracy present
    fr = [r["pruned_fraction"] for r in res.curve]
    assert fr == sorted(fr) and fr[0] == 0.0 and all("holdout_accuracy" in r for r in res.curve)
    assert res.details["chosen_fraction"] == 0.5
    # a pruned channel is exactly zero after the ReLU, and survives save/load
    with torch.no_grad():
        feats = res.model.conv_features(data.float_batch(slice(0, 16)))
    assert float(feats[:, zero].abs().max()) == 0.0
    path = save_model(res.model, tmp_path / "pruned.safetensors")
    again = load_model(path)
    assert torch.equal(again.conv2.weight == 0, res.model.conv2.weight == 0)
    assert torch.allclose(predict_logits(again, data.x), predict_logits(res.model, data.x), atol=1e-5)


def test_linear_layer_prunes_its_most_dormant_input_neurons(small, tmp_path):
    """``layer`` naming a Linear prunes its inputs: on the cnn, fc1's inputs are every (channel,
    position) neuron of the last conv block; a pruned neuron's weight column is zero, nothing else."""
    model, data = small
    res = DEFENSES.create("pruning", layer="fc1", fraction=0.4).repair(model, data)
    w0, w = model.fc1.weight.detach(), res.model.fc1.weight.detach()
    cols = (w == 0).all(0)
    n = round(0.4 * w0.shape[1])
    assert int(cols.sum()) == n == res.details["pruned"] and res.details["channels"] == w0.shape[1]
    assert torch.equal(w[:, ~cols], w0[:, ~cols]) and torch.equal(res.model.fc1.bias, model.fc1.bias)
    assert torch.equal(res.model.conv2.weight, model.conv2.weight)
    # the pruned columns are the inputs least active on the clean set (mean of the flattened conv block)
    with torch.no_grad():
        mean = torch.flatten(model.conv_features(data.float_batch()), 1).mean(0)
    assert float(mean[cols].max()) <= float(mean[~cols].min()) + 1e-6
    # fine-pruning keeps them at zero through fine-tuning, and they survive save/load
    fp = DEFENSES.create("fine-pruning", layer="fc1", fraction=0.4, epochs=1, schedule="once").repair(model, data)
    assert torch.equal((fp.model.fc1.weight == 0).all(0), cols)
    again = load_model(save_model(fp.model, tmp_path / "fp.safetensors"))
    assert torch.equal((again.fc1.weight == 0).all(0), cols)


def test_tolerance_picks_last_step_within_it(small):
    model, data = small
    res = DEFENSES.create("pruning", step=0.125, tolerance=0.0).repair(model, data)
    base = res.curve[0]["holdout_accuracy"]
    accs = [r["holdout_accuracy"] for r in res.curve]
    first_bad = next((i for i, a in enumerate(accs) if a < base), len(accs))
    assert res.details["chosen_fraction"] == res.curve[first_bad - 1]["fraction"]
    assert evaluate(res.model, data) >= base


def test_activations_of_a_copy_are_its_own(small, tiny_rgb):
    """The iterative schedule ranks a fine-tuned *copy* with the target found on the original: the
    activations must be the copy's (hooks on the original's layer would leave them all zero)."""
    import copy

    for model, data in ((small[0], small[1]), (build_model(ModelSpec("vgg-small", 4, (3, 16, 16), {"width": 8})).eval(), tiny_rgb)):
        target = PruneTarget(model, None)
        a = channel_activations(model, target, data)
        twin = copy.deepcopy(model)
        assert torch.allclose(channel_activations(twin, target, data), a) and float(a.max()) > 0
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(2.0)  # another model now: its activations differ
        assert not torch.allclose(channel_activations(twin, target, data), a)


def test_batchnorm_gate_is_zeroed_too(tiny_rgb):
    """vgg-small: the last conv feeds a BatchNorm; pruning zeroes both so the channel is 0 after ReLU."""
    model = build_model(ModelSpec("vgg-small", 4, (3, 16, 16), {"width": 8}))
    with torch.no_grad():  # non-trivial BN statistics and shifts
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
    res = DEFENSES.create("pruning", fraction=0.25).repair(model.eval(), tiny_rgb)
    assert res.details["layer"] == "body.17" and res.details["gate"] == "body.18"
    pruned = res.model.body[18].weight == 0
    assert int(pruned.sum()) == 8
    with torch.no_grad():
        out = res.model.conv_features(tiny_rgb.float_batch(slice(0, 8)))
    assert float(out[:, pruned].abs().max()) == 0.0 and float(out[:, ~pruned].abs().max()) > 0


def test_seed_weight_threshold_variant(small):
    model, data = small
    res = DEFENSES.create("pruning", criterion="weight", fraction=0.3).repair(model, data)
    w0 = model.conv2.weight.detach()
    t = float(w0.min()) + (float(w0.max()) - float(w0.min())) * 0.3
    expect = w0 <= t
    w = res.model.conv2.weight.detach()
    assert torch.equal(w == 0, expect | (w0 == 0))
    assert res.details["pruned"] == int(expect.sum())
    assert res.details["pruned_fraction"] == pytest.approx(int(expect.sum()) / w0.numel())


@pytest.mark.parametrize("schedule", ["once", "iterative"])
def test_fine_pruning_keeps_pruned_channels_at_zero(small, schedule):
    model, data = small
    res = DEFENSES.create("fine-pruning", fraction=0.5, epochs=1, schedule=schedule).repair(model, data)
    zero = res.model.conv2.weight.flatten(1).abs().sum(1) == 0
    assert int(zero.sum()) == 8 and bool((res.model.conv2.bias[zero] == 0).all())
    assert not torch.equal(res.model.fc1.weight, model.fc1.weight), "fine-tuning changed nothing"
    assert {r["finetuned"] for r in res.curve} == {0.0, 1.0}


def test_fine_tuning_curve_before_after(small):
    model, data = small
    res = DEFENSES.create("fine-tuning", epochs=1).repair(model, data, evaluate=make_evaluator(data, None))
    assert [r["finetuned"] for r in res.curve] == [0.0, 1.0]
    assert "clean_accuracy" in res.curve[1] and res.details["pruned_fraction"] == 0.0


@pytest.mark.parametrize("params,match", [
    ({"fraction": 1.0}, "fraction: Input should be less than 1"),
    ({"fraction": -0.1}, "fraction: Input should be greater than or equal to 0"),
    ({"max_fraction": 1.0}, "max_fraction"),
    ({"step": 0}, "step"),
    ({"colour": 1}, "unknown parameter"),
])
def test_bad_parameters(params, match):
    with pytest.raises(BackdoorLabError, match=match):
        DEFENSES.create("fine-pruning", **params)


def test_bad_layer_and_models(small):
    model, data = small
    with pytest.raises(BackdoorLabError, match="layer 'conv9' does not exist.*conv1, conv2"):
        DEFENSES.create("pruning", layer="conv9").repair(model, data)
    with pytest.raises(BackdoorLabError, match="'pool' is a MaxPool2d.*conv1, conv2, or a Linear.*fc1, fc2"):
        DEFENSES.create("pruning", layer="pool").repair(model, data)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(144, 3))
    with pytest.raises(BackdoorLabError, match="no convolutional layer"):
        DEFENSES.create("fine-pruning").repair(mlp, data)
    scripted = torch.jit.trace(model.eval(), data.float_batch(slice(0, 2)))
    with pytest.raises(BackdoorLabError, match="TorchScript"):
        DEFENSES.create("pruning").repair(scripted, data)
    with pytest.raises(BackdoorLabError, match="3 classes but the model has 10"):
        DEFENSES.create("pruning").repair(build_model(ModelSpec("cnn", 10, (1, 12, 12))), data)
    with pytest.raises(BackdoorLabError, match="empty"):
        DEFENSES.create("pruning").repair(model, data.subset(torch.tensor([], dtype=torch.long)))


@pytest.mark.slow
def test_fine_pruning_removes_badnets_where_pruning_alone_fails():
    """BadNets 3x3 all-to-one on an MNIST subset: pruning within 2 points of held-out accuracy
    leaves the backdoor; fine-pruning (iterative, seed 001's loop) removes most of it while the
    validation accuracy stays within the tolerance. (Measured with the victim's init seed 0/1/2 at
    one thread: ASR 0.35 / 0.10 / 0.14 after fine-pruning, 1.0 before; the full-MNIST bar of
    ASR <= 1% is measured by benchmarks/bench_repair.py.)"""
    from _backdoored import victim

    v = victim()
    if not v.full_mnist:
        pytest.skip("needs shared/data/mnist/mnist.npz (the 400-image mnist5k held-out set is too small)")
    res = DEFENSES.create("fine-pruning", step=0.15, epochs=5, lr=0.05).repair(
        v.model, v.holdout, evaluate=make_evaluator(v.test, v.triggered))
    d = res.details
    assert d["attack_success_rate_before"] > 0.95
    # pruning alone (the finetuned=0 rows) at the last step within 2 points of held-out accuracy
    alone = [r for r in res.curve if r["finetuned"] == 0.0]
    within = list(itertools.takewhile(lambda r: alone[0]["holdout_accuracy"] - r["holdout_accuracy"] <= 0.02, alone))
    assert within[-1]["attack_success_rate"] > 0.8, alone  # leaves the backdoor in place
    # fine-pruning removes most of it within the tolerance
    assert d["attack_success_rate"] < 0.5, d
    assert d["validation_accuracy_before"] - d["validation_accuracy"] <= 0.02 + 1e-9
    assert d["clean_accuracy_before"] - d["clean_accuracy"] <= 0.03
    assert d["pruned_fraction"] >= 0.5


@pytest.mark.slow
def test_neuron_fine_pruning_removes_badnets_where_channel_pruning_cannot():
    """The patch drives neurons at one position of the last conv block (the corner, dark on clean
    digits), spread over many channels that are busy elsewhere: ranking whole channels cannot find it,
    ranking fc1's input neurons can. Both one-shot within 2 points of held-out accuracy, then one
    fine-tuning (the paper's schedule), in 10% steps. Measured (seed 0, two threads, AVX2 CPU): both
    prune 0.70; channels CA 0.972 -> 0.972, ASR 1.0 -> 0.9933; neurons CA 0.972 -> 0.974, ASR 1.0 -> 0.0055."""
    from _backdoored import victim

    v = victim()
    if not v.full_mnist:
        pytest.skip("needs shared/data/mnist/mnist.npz (the 400-image mnist5k held-out set is too small)")
    kw = dict(evaluate=make_evaluator(v.test, v.triggered))
    channels = DEFENSES.create("fine-pruning", schedule="once", step=0.1).repair(v.model, v.holdout, **kw).details
    neurons = DEFENSES.create("fine-pruning", schedule="once", step=0.1, layer="fc1").repair(v.model, v.holdout, **kw).details
    assert channels["attack_success_rate_before"] > 0.95
    assert channels["attack_success_rate"] > 0.5, channels
    assert neurons["attack_success_rate"] < 0.05, neurons
    assert neurons["clean_accuracy_before"] - neurons["clean_accuracy"] <= 0.02
