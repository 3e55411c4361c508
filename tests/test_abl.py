"""Anti-Backdoor Learning (``abl``): isolation, unlearning, bad input, the runner and the CLI.

The BadNets case trains on the shared full-MNIST subset of ``_backdoored.py`` when present (8,000
training images, 10% of the non-target ones poisoned; 2,000 clean held-out; 1,000 test), else on
the embedded mnist5k.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from backdoorlab.evaluation import isolation_scores, make_evaluator
from backdoorlab.defenses import DEFENSES, RobustTrainer, RobustTrainResult
from backdoorlab.errors import BackdoorLabError
from backdoorlab.models import ModelSpec, build_model
from backdoorlab.types import ImageSet, PoisonedSet

# small for CPU: 5 LGA epochs (the default), 2 more on the rest, 10 unlearning epochs (defaults otherwise)
FAST = {"isolation_epochs": 5, "epochs": 7}


@dataclass(frozen=True)
class _Data:
    train: PoisonedSet
    holdout: ImageSet
    test: ImageSet
    triggered: PoisonedSet


@lru_cache(maxsize=1)
def _data() -> _Data:
    from _backdoored import poisoned_data

    return _Data(*poisoned_data()[:4])


@lru_cache(maxsize=1)
def _badnets_abl():
    v = _data()
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", 10, (1, 28, 28)))
    res = DEFENSES.create("abl", **FAST).train(model, v.train.without_ground_truth(), clean=v.holdout,
                                               evaluate=make_evaluator(v.test, v.triggered))
    return v, res


def test_badnets_isolates_poison_and_unlearns_backdoor():
    v, res = _badnets_abl()
    assert isinstance(res, RobustTrainResult)
    n = len(v.train)
    assert res.isolated_indices.numel() == round(0.01 * n)
    assert res.isolated_indices.unique().numel() == res.isolated_indices.numel()
    precision = float(v.train.is_poison[res.isolated_indices].float().mean())
    assert precision >= 0.9, precision
    # the runner's scoring computes the same precision from the indices
    assert isolation_scores(res, v.train.is_poison)["isolation_precision"] == pytest.approx(precision)
    ph = res.phases
    # before unlearning the backdoor is there (99% of the poison is still in the training set) ...
    assert ph["training"]["attack_success_rate"] > 0.9
    # ... unlearning the isolated 1% removes it while clean accuracy stays near
    assert ph["unlearning"]["attack_success_rate"] <= 0.1, ph["unlearning"]
    assert ph["training"]["clean_accuracy"] - ph["unlearning"]["clean_accuracy"] <= 0.03
    assert ph["unlearning"]["clean_accuracy"] > 0.9
    # the per-sample loss traces: one row per isolation epoch; poisoned samples end far below clean ones
    tr = res.loss_traces
    assert tr.shape == (FAST["isolation_epochs"], n)
    assert float(tr[-1][v.train.is_poison].median()) < 0.1 * float(tr[-1][~v.train.is_poison].median())
    # the model returned is the unlearned one
    from backdoorlab.train import evaluate

    assert evaluate(res.model, v.triggered) == pytest.approx(ph["unlearning"]["attack_success_rate"])


def test_clean_training_set_costs_little_accuracy():
    """No poison: ABL isolates (easy) clean samples and unlearns them; CA must stay within 2 points."""
    v = _data()
    clean = v.train.subset(torch.nonzero(~v.train.is_poison).flatten()).without_ground_truth()
    torch.manual_seed(0)
    res = DEFENSES.create("abl", isolation_epochs=2, epochs=4, unlearning_epochs=3).train(
        build_model(ModelSpec("cnn", 10, (1, 28, 28))), clean, clean=v.holdout, evaluate=make_evaluator(v.test, None))
    ph = res.phases
    assert ph["training"]["clean_accuracy"] > 0.9
    assert ph["training"]["clean_accuracy"] - ph["unlearning"]["clean_accuracy"] <= 0.02, ph


@pytest.mark.parametrize("params, words", [
    ({"gamma": 0.0}, ["gamma", "> 0"]),
    ({"gamma": -1.0}, ["gamma", "> 0"]),
    ({"isolation_ratio": 0.0}, ["isolation_ratio", "(0, 0.5]"]),
    ({"isolation_ratio": 0.6}, ["isolation_ratio", "(0, 0.5]"]),
    ({"isolation_epochs": 12, "epochs": 10}, ["isolation_epochs", "raise epochs to at least 12"]),
    ({"isolation_epochs": 0}, ["isolation_epochs", ">= 1"]),
    ({"lga": "both"}, ["lga"]),
    ({"isolation_ratio": 0.5, "relearn_exclude": 0.5}, ["relearn_exclude", "below 1"]),
    ({"relearn_exclude": 1.0}, ["relearn_exclude"]),
    ({"recipe": {"lr": 1.5}}, ["recipe sets lr", "abl's own"]),
    ({"recipe": {"epochs": 3}}, ["recipe sets epochs", "isolation_epochs"]),
    ({"recipe": {"schedule": "bogus"}}, ["recipe is not a valid train section", "schedule"]),
    ({"recipe": {"lookahaed": True}}, ["recipe is not a valid train section", "lookahaed"]),
])
def test_bad_parameters_are_clear_errors(params, words):
    with pytest.raises(BackdoorLabError) as exc:
        DEFENSES.create("abl", **params)
    assert all(w in str(exc.value) for w in words), str(exc.value)


def test_bad_data_is_a_clear_error(tiny):
    model = build_model(ModelSpec("cnn", 3, (1, 12, 12), {"width": 4, "hidden": 8}))
    abl = DEFENSES.create("abl", isolation_epochs=1, epochs=1, unlearning_epochs=0, isolation_ratio=0.005)
    with pytest.raises(BackdoorLabError, match="isolates none"):  # 0.5% of 60 samples
        abl.train(model, tiny)
    wrong = build_model(ModelSpec("cnn", 4, (1, 12, 12), {"width": 4, "hidden": 8}))
    with pytest.raises(BackdoorLabError, match="3 classes but the model has 4"):
        DEFENSES.create("abl", isolation_ratio=0.1).train(wrong, tiny)
    with pytest.raises(TypeError):  # defenses never receive the ground truth
        DEFENSES.create("abl", isolation_ratio=0.1).train(model, tiny, truth=torch.zeros(5, dtype=torch.bool))


def test_recipe_reaches_both_training_phases_and_isolation_stays_constant(tiny, monkeypatch):
    """A victim's recipe (e.g. fastnet's) trains ABL's phases 1 and 2; the isolation keeps a constant rate,
    phase 2 takes the recipe's schedule, and the losses are recorded in float32 under autocast too."""
    import backdoorlab.train as tr

    seen, real = [], tr.train

    def spy(model, data, cfg, **kw):
        seen.append(cfg)
        return real(model, data, cfg, **kw)

    monkeypatch.setattr(tr, "train", spy)
    recipe = {"lookahead": True, "label_smoothing": 0.1, "schedule": "linear", "warmup": 0.5, "autocast": "bf16"}
    abl = DEFENSES.create("abl", isolation_epochs=1, epochs=2, unlearning_epochs=1, isolation_ratio=0.1,
                          lr=0.02, recipe=recipe)
    model = build_model(ModelSpec("cnn", 3, (1, 12, 12), {"width": 4, "hidden": 8}))
    res = abl.train(model, tiny)
    iso, rest = seen
    assert iso.schedule == "constant" and rest.schedule == "linear"
    for cfg in (iso, rest):
        assert (cfg.lookahead, cfg.label_smoothing, cfg.warmup, cfg.autocast, cfg.lr) == (True, 0.1, 0.5, "bf16", 0.02)
    assert res.loss_traces.dtype == torch.float32 and bool(torch.isfinite(res.loss_traces).all())
    assert DEFENSES.create("abl")._train_config(3, "cosine").warmup == 0.0  # no recipe: as measured before


@pytest.mark.parametrize("decoupled", [True, False])
def test_unlearning_weight_decay_scales_with_the_unlearning_rate(decoupled):
    """A recipe's decoupled decay shrinks the weights by ``weight_decay`` per step at ABL's ``lr``; at the
    unlearning rate (3,000x smaller here) the shrink per step is that much smaller, in every parameter
    group (fastnet's batch-norm biases run at 64x the rate). Kept at 0.2% per step, it wrecked the model."""
    from backdoorlab.train import make_optimizer

    abl = DEFENSES.create("abl", lr=1.5, weight_decay=0.002, momentum=0.0, unlearning_lr=5e-4,
                          recipe={"decoupled_weight_decay": decoupled})
    assert abl._train_config(2, "cosine").weight_decay == 0.002  # phases 1 and 2: the recipe's decay as given
    model = build_model(ModelSpec("fastnet", 10, (3, 32, 32), {"widths": (8, 16, 16)}))
    opt = make_optimizer(model, abl._unlearning_config())
    assert sorted(g["lr_scale"] for g in opt.param_groups) == [1.0, 64.0]  # fastnet's batch-norm biases at 64x
    shrink = {}
    for g in opt.param_groups:
        for p in g["params"]:
            with torch.no_grad():
                p.uniform_(0.5, 1.0)
            p.grad = torch.zeros_like(p)  # a step of decay alone
    before = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    opt.step()
    for g in opt.param_groups:
        shrink[g["lr_scale"]] = max(float((1 - p.detach().double() / before[id(p)].double()).mean()) for p in g["params"])
    if decoupled:  # 0.002 x 5e-4 / 1.5 = 6.7e-7 per step in every group (it was 0.002 before the fix)
        assert all(4e-7 < v < 1e-6 for v in shrink.values()), shrink
    else:  # coupled, unchanged: lr x lr_scale x weight_decay (1e-6 and 6.4e-5)
        assert 5e-7 < shrink[1.0] < 2e-6 and 3e-5 < shrink[64.0] < 1e-4, shrink


def test_is_a_registered_robust_trainer():
    abl = DEFENSES.create("abl")
    assert isinstance(abl, RobustTrainer) and abl.family == "robust-trainer"
    assert (abl.gamma, abl.isolation_ratio) == (0.2, 0.01)


def test_experiment_yaml_runs_abl_in_place_of_training(tmp_path):
    """``defenses: [{name: abl}]`` through the runner: per-phase CA/ASR, isolation precision, figure."""
    from backdoorlab.config import load_config
    from backdoorlab.experiment import run
    from backdoorlab.store import Store

    cfg = tmp_path / "abl.yaml"
    cfg.write_text("name: abl-smoke\ndata: {name: mnist5k, train_size: 1200}\ntrain: {epochs: 2}\n"
                   "attack: {name: badnets, rate: 0.1, size: 3}\n"
                   "defenses: [{name: abl, isolation_epochs: 2, epochs: 3, unlearning_epochs: 1, isolation_ratio: 0.05}]\n")
    rec = run(load_config(cfg), Store(tmp_path / "store"))
    m = rec.metrics
    for k in ("isolation_precision", "clean_accuracy", "attack_success_rate", "isolation.clean_accuracy",
              "isolation.attack_success_rate", "training.attack_success_rate", "unlearning.clean_accuracy",
              "unlearning.attack_success_rate", "unlearning.holdout_accuracy"):
        assert f"defense.abl.{k}" in m, k
    assert 0 <= m["defense.abl.isolation_precision"] <= 1
    assert m["defense.abl.unlearning.clean_accuracy"] == pytest.approx(m["defense.abl.clean_accuracy"])
    from pathlib import Path

    png = Path(rec.run_dir) / rec.artifacts["figure:abl_loss_traces"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_train_robust_json_and_torchscript_export(tmp_path):
    from backdoorlab.attacks import ATTACKS, poison
    from backdoorlab.cli import app
    from backdoorlab.data import load_source, stratified_subsample

    base = stratified_subsample(load_source("mnist5k").train, 1500, torch.Generator().manual_seed(0))
    p = poison(base, ATTACKS.create("badnets", size=3), rate=0.1, target=0, generator=torch.Generator().manual_seed(1))
    npz = tmp_path / "poisoned.npz"
    np.savez(npz, x=p.x.permute(0, 2, 3, 1).numpy(), y=p.y.numpy(), is_poison=p.is_poison.numpy())
    out = tmp_path / "model.pt"
    r = CliRunner().invoke(app, ["train-robust", "--data", str(npz), "--model", "cnn", "--method", "abl", "--export",
                                 str(out), "--json", "--figures", str(tmp_path / "fig"), "-p", "isolation_epochs=2",
                                 "-p", "epochs=3", "-p", "unlearning_epochs=1", "-p", "isolation_ratio=0.05"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert {"isolated_indices", "clean_accuracy", "seconds", "isolation_precision", "phases"} <= set(d)
    held = round(0.1 * 1500)
    assert d["train_size"] + d["holdout_size"] == 1500 and d["holdout_size"] == pytest.approx(held, abs=10)
    assert len(d["isolated_indices"]) == round(0.05 * d["train_size"])
    assert all(0 <= i < 1500 for i in d["isolated_indices"])
    # precision is recomputed from the indices in the file's order
    assert d["isolation_precision"] == pytest.approx(float(p.is_poison[d["isolated_indices"]].float().mean()))
    assert 0.5 < d["clean_accuracy"] <= 1.0 and d["seconds"] > 0
    assert (tmp_path / "fig" / "loss_traces.png").is_file()
    # the TorchScript export loads without backdoorlab and predicts like the JSON says
    ts = torch.jit.load(str(out))
    with torch.no_grad():
        logits = ts(p.float_batch(slice(0, 300)))
    assert logits.shape == (300, 10)
    assert float((logits.argmax(1) == p.y[:300]).float().mean()) > 0.5
    # bad input: a method that is not a robust trainer
    r2 = CliRunner().invoke(app, ["train-robust", "--data", str(npz), "--method", "strip"])
    assert r2.exit_code == 2 and "not a robust trainer" in r2.output


def test_unlikelihood_keeps_its_gradient_on_a_saturated_trigger():
    """A trigger learned to float32 saturation (p_y rounds to 1) must still be unlearned: the loss is
    -log(1 - p_y), exact, with a gradient that lowers the poisoned label's logit."""
    from backdoorlab.defenses.abl import unlearning_loss

    logits = torch.tensor([[40.0, 0.0, 0.0], [1.0, 2.0, 3.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    loss = unlearning_loss(logits, y, "unlikelihood")
    d = logits.detach().double()  # log(1 - p_y) = log sum_{j != y} e^{z_j} - log sum_j e^{z_j}, by hand
    expect = -((torch.log(torch.exp(d[0, 1:]).sum()) - torch.logsumexp(d[0], 0))
               + (torch.log(torch.exp(d[1, :2]).sum()) - torch.logsumexp(d[1], 0))) / 2
    assert float(loss.detach()) == pytest.approx(float(expect), rel=1e-4)
    (g,) = torch.autograd.grad(loss, logits)
    assert float(g[0, 0]) > 0.4  # descending on the loss lowers the saturated label's logit
