"""STRIP: the entropy computation, the threshold, Guarded, bad input, the FRR/FAR bar on a BadNets
MNIST victim, and the ``guard`` / ``repair`` commands."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from backdoorlab import metrics as M
from backdoorlab.cli import app
from backdoorlab.defenses import DEFENSES, Guarded, InputDetector, Strip
from backdoorlab.defenses.strip import superimpose
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet


class Linear(nn.Module):
    """A deterministic toy classifier over 1x4x4 images."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.linspace(-2, 2, 48).view(3, 16))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.flatten(1))


def _set(n, seed=0, value=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 4, 4), generator=g, dtype=torch.uint8) if value is None else \
        torch.full((n, 1, 4, 4), value, dtype=torch.uint8)
    return ImageSet(x, torch.arange(n) % 3, 3, name="toy")


def entropy_bits(logits):
    p = logits.softmax(1)
    return -(p * p.clamp_min(1e-30).log2()).sum(1)


def test_registered_and_superimpose_modes():
    assert isinstance(DEFENSES.create("strip"), InputDetector)
    x = torch.tensor([0.2, 0.7]).view(1, 1, 2, 1, 1)
    h = torch.tensor([0.6, 0.6]).view(1, 1, 2, 1, 1)
    assert torch.allclose(superimpose(x, h, "sum").flatten(), torch.tensor([0.8, 1.0]))  # saturating add
    assert torch.allclose(superimpose(x, h, "average").flatten(), torch.tensor([0.4, 0.65]))
    assert torch.allclose(superimpose(x, h, "add").flatten(), torch.tensor([0.8, 1.3]))  # the paper's float add


@pytest.mark.parametrize("mode", ["sum", "add", "average"])
def test_entropy_matches_direct_computation(mode):
    """With a held-out pool of identical images every blend is known: the mean entropy must equal
    the entropy of the model on that one blend, per input."""
    model = Linear()
    pool = _set(30, value=40)
    det = Strip(samples=5, superimpose=mode, batch_size=7).fit(model, pool)
    x = _set(11, seed=3)
    xf = x.float_batch()
    h = pool.float_batch(slice(0, 1))
    blend = {"sum": (xf + h).clamp(0, 1), "add": xf + h, "average": 0.5 * (xf + h)}[mode]
    expect = entropy_bits(model(blend).detach())
    assert torch.allclose(det.entropy(x.x), expect, atol=1e-5)
    assert torch.allclose(det.score(xf), -expect, atol=1e-5)  # float input in [0, 1] gives the same


def test_threshold_meets_preset_frr_on_the_fit_set_and_is_deterministic():
    model = Linear()
    clean = _set(400)
    det = Strip(samples=8, frr=0.05).fit(model, clean)
    assert det.clean_entropy.shape == (400,)
    assert float((det.clean_entropy < det.entropy_threshold).float().mean()) == pytest.approx(0.05, abs=1 / 400 + 1e-9)
    r1, r2 = det.detect(clean.x[:50]), det.detect(clean.x[:50])
    assert torch.equal(r1.scores, r2.scores) and torch.equal(r1.flagged, r1.scores > r1.threshold)
    assert r1.threshold == pytest.approx(-det.entropy_threshold)
    normal = Strip(samples=8, frr=0.05, threshold_rule="normal").fit(model, clean)
    e = normal.clean_entropy.double()
    z = -1.6448536269514729  # Phi^-1(0.05)
    assert normal.entropy_threshold == pytest.approx(float(e.mean() + z * e.std()), rel=1e-6)


def test_bad_input():
    model = Linear()
    with pytest.raises(BackdoorLabError, match="has 10 images but STRIP with samples=20 needs at least 21"):
        Strip(samples=20).fit(model, _set(10))
    with pytest.raises(BackdoorLabError, match="not fitted"):
        Strip().detect(torch.zeros(1, 1, 4, 4))
    with pytest.raises(BackdoorLabError, match="not fitted"):
        Guarded(model, Strip())
    det = Strip(samples=4).fit(model, _set(20))
    with pytest.raises(BackdoorLabError, match="shape"):
        det.detect(torch.zeros(2, 3, 4, 4))
    with pytest.raises(BackdoorLabError, match=r"\[0, 1\]"):
        det.detect(torch.full((2, 1, 4, 4), 3.0))
    for params, match in (({"samples": 1}, "samples"), ({"frr": 0.0}, "frr"), ({"superimpose": "max"}, "superimpose")):
        with pytest.raises(BackdoorLabError, match=match):
            DEFENSES.create("strip", **params)


def test_guarded_contract():
    model = Linear()
    det = Strip(samples=4, frr=0.3).fit(model, _set(60))
    g = Guarded(model, det)
    x = _set(40, seed=5).x
    pred, res = g.guard(x)
    assert res.flagged.any() and (~res.flagged).any()
    assert g.num_classes == 4 and g.trojaned_class == 3
    assert bool((pred[res.flagged] == 3).all())
    assert torch.equal(pred[~res.flagged], model(x.float() / 255).argmax(1)[~res.flagged])
    logits = g(x.float() / 255)
    assert logits.shape == (40, 4) and torch.isfinite(logits).all()
    assert torch.equal(logits.argmax(1), pred) and torch.equal(g.predict(x), pred)


# ----------------------------------------------------------------------------- on a backdoored model
@pytest.fixture(scope="module")
def victim():
    from _backdoored import victim as build

    return build()


@pytest.mark.slow
def test_strip_detects_badnets_patch(victim):
    """BadNets 3x3 all-to-one: triggered inputs have lower entropy; FAR and FRR near the preset."""
    det = DEFENSES.create("strip", samples=10, frr=0.01).fit(victim.model, victim.holdout)
    clean, trig = det.detect(victim.test.x), det.detect(victim.triggered.x)
    assert float(-trig.scores.mean()) < 0.25 * float(-clean.scores.mean())
    frr, far = M.frr(clean.flagged), M.far(trig.flagged)
    auroc = M.auroc(torch.cat([clean.scores, trig.scores]),
                    torch.cat([torch.zeros(len(clean.scores)), torch.ones(len(trig.scores))]))
    assert frr <= 0.03 and far <= 0.02 and auroc > 0.99, (frr, far, auroc)
    # the traced inference copy gives the eager model's entropies
    few = victim.holdout.subset(torch.arange(200))
    eager = DEFENSES.create("strip", samples=10, accelerate=False).fit(victim.model, few)
    fast = DEFENSES.create("strip", samples=10).fit(victim.model, few)
    assert isinstance(fast.model, torch.jit.ScriptModule) and not isinstance(eager.model, torch.jit.ScriptModule)
    assert torch.allclose(eager.entropy(victim.triggered.x[:50]), fast.entropy(victim.triggered.x[:50]), atol=1e-4)
    # the guarded model answers K = 10 for flagged inputs and the model's class otherwise
    x = torch.cat([victim.test.x[:20], victim.triggered.x[:20]])
    pred, res = Guarded(victim.model, det).guard(x)
    assert bool((pred[res.flagged] == 10).all()) and int(res.flagged[20:].sum()) >= 19


# ----------------------------------------------------------------------------- the commands
runner = CliRunner()


def _npz(path, data: ImageSet, **extra):
    np.savez(path, x=data.x.permute(0, 2, 3, 1).numpy(), y=data.y.numpy(), **extra)
    return str(path)


@pytest.fixture(scope="module")
def files(victim, tmp_path_factory):
    from backdoorlab.models import save_model

    d = tmp_path_factory.mktemp("guard")
    model = save_model(victim.model, d / "victim.safetensors")
    clean = _npz(d / "clean.npz", victim.holdout.subset(torch.arange(300)))
    test = _npz(d / "test.npz", victim.test.subset(torch.arange(200)))
    trig = _npz(d / "trig.npz", victim.triggered.subset(torch.arange(150)))
    x = torch.cat([victim.test.x[:30], victim.triggered.x[:30]]).permute(0, 2, 3, 1).numpy()
    mixed = d / "mixed.npz"
    np.savez(mixed, x=x, is_poison=np.r_[np.zeros(30, bool), np.ones(30, bool)])  # no labels: not needed
    return {"dir": d, "model": str(model), "clean": clean, "test": test, "trig": trig, "mixed": str(mixed)}


@pytest.mark.slow
def test_guard_command(files):
    d = files["dir"]
    r = runner.invoke(app, ["guard", "--model", files["model"], "--clean", files["clean"], "--inputs", files["mixed"],
                            "--samples", "8", "--csv", str(d / "out" / "g.csv"), "--figures", str(d / "fig"), "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    for key in ("flagged", "scores", "threshold", "inputs_per_second", "frr", "far", "auroc", "predictions"):
        assert key in j, key
    assert len(j["flagged"]) == len(j["scores"]) == 60 and j["inputs_per_second"] > 0
    assert j["far"] <= 0.1 and j["frr"] <= 0.1 and j["auroc"] > 0.95
    rows = list(csv.DictReader(open(d / "out" / "g.csv")))
    assert len(rows) == 60 and list(rows[0]) == ["index", "prediction", "score", "flagged"]
    assert all((r["prediction"] == "10") == (r["flagged"] == "1") for r in rows)
    assert math.isclose(float(rows[3]["score"]), j["scores"][3], abs_tol=1e-5)
    assert (d / "fig" / "strip_entropy.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in (d / "out").iterdir() if p.name.startswith(".")], "a temporary file was left behind"


@pytest.mark.slow
def test_repair_command(files):
    d = files["dir"]
    out_model = d / "repaired.safetensors"
    r = runner.invoke(app, ["repair", "--model", files["model"], "--clean", files["clean"], "--method", "pruning",
                            "-p", "step=0.25", "--eval", files["test"], "--triggered", files["trig"],
                            "--out", str(out_model), "--figures", str(d / "fig"), "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.stdout)
    for key in ("clean_accuracy", "attack_success_rate", "pruned_fraction", "curve"):
        assert key in j, key
    assert len(j["curve"]) == 4 and 0 <= j["clean_accuracy"] <= 1 and 0 <= j["attack_success_rate"] <= 1
    from backdoorlab.models import load_model

    repaired = load_model(out_model)
    zero = int((repaired.conv2.weight.flatten(1).abs().sum(1) == 0).sum())
    assert zero == round(j["pruned_fraction"] * 64)
    assert (d / "fig" / "repair_curve.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,match", [
    (["repair", "--method", "strip"], "not a repairer"),
    (["repair", "--method", "pruning", "-p", "fraction=1.5"], "fraction"),
    (["repair", "--method", "pruning", "-p", "layer=conv7"], "layer 'conv7' does not exist"),
    (["guard", "--inputs", "CLEAN", "--samples", "400"], "needs at least 401"),
])
def test_defense_commands_bad_input(files, args, match):
    cmd, *rest = args
    rest = [files["clean"] if a == "CLEAN" else a for a in rest]
    r = runner.invoke(app, [cmd, "--model", files["model"], "--clean", files["clean"], *rest])
    assert r.exit_code == 2, r.output
    assert match in " ".join(r.output.split()) and "Traceback" not in r.output
