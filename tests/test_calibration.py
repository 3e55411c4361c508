"""Calibrated verdicts (issue 22): the pairwise scan's null fitted on clean models
(:mod:`backdoorlab.defenses._pair_null`), ``backdoorlab calibrate`` and ``audit --calibration``."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from backdoorlab.cli import app
from backdoorlab.defenses._pair_null import PairNull, TargetNull, fit, fit_targets, residuals
from backdoorlab.errors import BackdoorLabError
from test_inspect_cleanse import K, QuadrantNet, quadrant_data


class Variant(QuadrantNet):
    """A QuadrantNet with per-class gains (clean models differ), backdoored or not."""

    def __init__(self, seed: int, backdoor: bool = False, all_to_one: bool = False):
        super().__init__(backdoor=backdoor, all_to_one=all_to_one)
        g = torch.Generator().manual_seed(seed)
        self.gain = 1.0 + 0.15 * torch.rand(K, generator=g)

    def forward(self, x):
        return super().forward(x) * self.gain


def _lookalike_norms(seed: int, planted: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic (10, 10) pattern norms: pair (7, 1) is a natural look-alike, small in every model."""
    g = torch.Generator().manual_seed(seed)
    n = 20 * torch.exp(0.25 * torch.randn(10, 10, generator=g))
    n[7, 1] /= 6.0
    if planted:
        n[planted] /= 6.0
    n.fill_diagonal_(float("nan"))
    return n, torch.ones(10, 10, dtype=torch.bool)


def test_null_ignores_a_natural_lookalike_and_finds_a_planted_pair():
    clean = [_lookalike_norms(s) for s in range(12)]
    null = fit([n for n, _ in clean], [r for _, r in clean], (1, 28, 28))
    assert null.threshold > 0 and null.target_threshold > 0 and null.n_models == 12
    # the MAD rule within one model flags the look-alike pair of a clean model; the null does not
    from backdoorlab.defenses.base import mad_anomaly_index

    n, r = _lookalike_norms(100)
    res, _ = residuals(n)
    assert float(-mad_anomaly_index(res.flatten()).view(10, 10)[7, 1]) > 4.0
    assert null.score(n, r) < 0.8  # well under the threshold (1)
    # a planted pair as small as the look-alike is 6x smaller than that pair in clean models
    n, r = _lookalike_norms(101, planted=(3, 8))
    pz, _ = null.zscores(n, r)
    assert null.score(n, r) > 1.5 and divmod(int(torch.nan_to_num(pz, nan=-1e9).argmax()), 10) == (3, 8)
    # an unreached pair does not count
    r2 = r.clone()
    r2[3, 8] = False
    assert null.score(n, r2) < null.score(n, r)


def test_null_file_round_trip_and_refusals(tmp_path):
    clean = [_lookalike_norms(s) for s in range(5)]
    null = fit([n for n, _ in clean], [r for _, r in clean], (1, 28, 28), source="test")
    p = null.save(tmp_path / "null.safetensors")
    back = PairNull.load(p)
    assert torch.equal(back.pair_mean.nan_to_num(), null.pair_mean.nan_to_num()) and back.threshold == null.threshold
    assert back.input_shape == (1, 28, 28) and back.num_classes == 10 and "5 clean models" in back.describe()
    with pytest.raises(BackdoorLabError, match="10 classes of shape .1, 28, 28.*43 classes"):
        back.check(43, (3, 32, 32))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(BackdoorLabError, match="not a backdoorlab calibration file"):
        PairNull.load(tmp_path / "junk.safetensors")
    with pytest.raises(BackdoorLabError, match="does not exist"):
        PairNull.load(tmp_path / "none.safetensors")
    with pytest.raises(BackdoorLabError, match="at least 3 clean models"):
        fit([clean[0][0]] * 2, [clean[0][1]] * 2, (1, 28, 28))


@pytest.fixture
def model_files(tmp_path, monkeypatch):
    for i in range(4):
        torch.jit.trace(Variant(i), torch.rand(2, 1, 10, 10)).save(str(tmp_path / f"clean{i}.pt"))
    torch.jit.trace(Variant(10, backdoor=True), torch.rand(2, 1, 10, 10)).save(str(tmp_path / "suspect.pt"))
    torch.jit.trace(Variant(11), torch.rand(2, 1, 10, 10)).save(str(tmp_path / "clean-new.pt"))
    c = quadrant_data(30, 0)
    np.savez(tmp_path / "clean.npz", x=c.x[:, 0].numpy(), y=c.y.numpy())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_calibrate_then_audit_cli(model_files):
    runner = CliRunner()
    common = ["--data", "clean.npz", "--images-per-class", "30"]
    r = runner.invoke(app, ["calibrate", *[a for i in range(4) for a in ("--model", f"clean{i}.pt")], *common,
                            "--out", "null.safetensors", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["models"] == 4 and d["num_classes"] == K and (model_files / "null.safetensors").is_file()
    r = runner.invoke(app, ["audit", "--model", "suspect.pt", *common, "--calibration", "null.safetensors", "--json",
                            "--out", "a1"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["backdoored"] and d["flagged_pairs"][0] == [0, 2] and 2 in d["flagged_targets"]
    assert d["anomaly_index"] > 2.0 and "calibrated on 4 clean models" in d["threshold_source"]
    r = runner.invoke(app, ["audit", "--model", "clean-new.pt", *common, "--calibration", "null.safetensors", "--json",
                            "--out", "a2"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert not d["backdoored"] and d["anomaly_index"] < 0.7
    # a calibration of other data is refused before any scan, and nothing is written
    other = PairNull(torch.zeros(10, 10), torch.ones(10, 10), torch.zeros(10), torch.ones(10), 3.0, 3.0, 5, (1, 28, 28))
    other.save(model_files / "other.safetensors")
    r = runner.invoke(app, ["audit", "--model", "suspect.pt", *common, "--calibration", "other.safetensors", "--out", "a3"])
    assert r.exit_code == 2 and "calibrate on clean models" in r.output and not (model_files / "a3").exists()
    # a suspect scanned with other settings than the clean models is refused too
    r = runner.invoke(app, ["audit", "--model", "suspect.pt", "--data", "clean.npz", "--images-per-class", "20",
                            "--calibration", "null.safetensors", "--out", "a4"])
    assert r.exit_code == 2 and "images_per_class 30 (here 20)" in r.output and not (model_files / "a4").exists()
    # so is a suspect scanned on every pair against a calibration within the budget
    r = runner.invoke(app, ["audit", "--model", "suspect.pt", *common, "--every-pair", "--calibration", "null.safetensors",
                            "--out", "a5"])
    assert r.exit_code == 2 and "budget 130000 (here None)" in r.output and not (model_files / "a5").exists()
    r = runner.invoke(app, ["calibrate", "--model", "clean0.pt", *common, "--out", "x.safetensors"])
    assert r.exit_code == 2 and "at least 3 clean models" in r.output and not (model_files / "x.safetensors").exists()
    # the pairwise verdict against a null of another architecture says so (the suspect's registered name)
    import dataclasses
    from types import SimpleNamespace

    from backdoorlab.defenses.pairwise import PairwiseTriggerInspector

    null = dataclasses.replace(PairNull.load(model_files / "null.safetensors"), architectures=("lenet", "mlp", "mlp"))
    suspect = Variant(11)
    suspect.spec = SimpleNamespace(name="cnn")
    res = PairwiseTriggerInspector(calibration=str(null.save(model_files / "null-mlp.safetensors")),
                                   images_per_class=30).inspect(suspect, quadrant_data(30, 0))
    assert "(4 models on 5 classes; lenet x1, mlp x2)" in res.threshold_source
    assert res.threshold_source.endswith("is not among the calibration models' (lenet, mlp): calibrate on clean models "
                                         "of its architecture") and not res.backdoored


def _target_norms(seed: int, planted: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic Neural Cleanse mask norms of 10 targets: target 1 is naturally small in every model
    (a simple class), and each model has its own scale."""
    g = torch.Generator().manual_seed(seed)
    v = (20 + 20 * torch.rand(1, generator=g)) * torch.exp(0.2 * torch.randn(10, generator=g))
    v[1] /= 4.0
    if planted is not None:
        v[planted] /= 8.0
    return v, torch.ones(10, dtype=torch.bool)


def test_target_null_ignores_a_naturally_small_target_and_finds_a_planted_one(tmp_path):
    from backdoorlab.defenses.base import mad_anomaly_index

    clean = [_target_norms(s) for s in range(12)]
    null = fit_targets([v for v, _ in clean], [r for _, r in clean], (1, 28, 28), source="test")
    assert null.n_models == 12 and null.num_classes == 10 and null.threshold > 0
    v, r = _target_norms(100)
    assert float(-mad_anomaly_index(v)[1]) > 2.5  # Neural Cleanse's own rule flags the simple class
    assert null.score(v, r) < 0.8  # the null does not
    v, r = _target_norms(101, planted=6)
    z = null.zscores(v, r)
    assert null.score(v, r) > 2.0 and int(z.argmax()) == 6
    r[6] = False  # a target whose search did not reach the attack success rate does not count
    assert null.score(v, r) < 1.0
    # the file round trip, and a calibration of the other inspector refused by name
    back = TargetNull.load(null.save(tmp_path / "nc.safetensors"))
    assert torch.equal(back.mean, null.mean) and back.threshold == null.threshold and back.source == "test"
    with pytest.raises(BackdoorLabError, match="calibrates neural-cleanse, not pairwise"):
        PairNull.load(tmp_path / "nc.safetensors")
    pn = fit([n for n, _ in (_lookalike_norms(s) for s in range(4))], [torch.ones(10, 10, dtype=torch.bool)] * 4, (1, 28, 28))
    with pytest.raises(BackdoorLabError, match="calibrates pairwise, not neural-cleanse"):
        TargetNull.load(pn.save(tmp_path / "pair.safetensors"))
    with pytest.raises(BackdoorLabError, match="at least 3 clean models"):
        fit_targets([v, v], [r, r], (1, 28, 28))


def test_calibrate_neural_cleanse_cli_then_its_calibrated_verdict(model_files):
    from backdoorlab.defenses.neural_cleanse import NeuralCleanse

    runner = CliRunner()
    r = runner.invoke(app, ["calibrate", "--inspector", "neural-cleanse", *[a for i in range(4) for a in ("--model", f"clean{i}.pt")],
                            "--data", "clean.npz", "--out", "nc.safetensors", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["inspector"] == "neural-cleanse" and d["models"] == 4 and d["pair_threshold"] is None
    c = quadrant_data(30, 0)
    insp = NeuralCleanse(calibration=str(model_files / "nc.safetensors"))
    bad = insp.inspect(Variant(10, backdoor=True, all_to_one=True), c)  # a bright pixel sends every image to 2
    assert bad.backdoored and bad.flagged_targets == [2] and bad.max_anomaly > 4.0 and bad.threshold == 1.0
    assert "calibrated on 4 clean models" in bad.threshold_source
    ok = insp.inspect(Variant(11), c)
    assert not ok.backdoored and ok.max_anomaly < 0.7
    # a null of other architectures than the suspect's says so in the verdict (docs/populations.md)
    import dataclasses
    from types import SimpleNamespace

    null = TargetNull.load(model_files / "nc.safetensors")
    assert null.architectures == ("unknown",) * 4  # TorchScript models carry no registered name
    mlp = dataclasses.replace(null, architectures=("mlp",) * 4).save(model_files / "nc-mlp.safetensors")
    back = TargetNull.load(mlp)
    assert back.architectures == ("mlp",) * 4 and "mlp x4" in back.describe()
    suspect = Variant(11)
    suspect.spec = SimpleNamespace(name="cnn")
    res = NeuralCleanse(calibration=str(mlp)).inspect(suspect, c)
    assert "architecture 'cnn' is not among the calibration models' (mlp)" in res.threshold_source
    assert res.max_anomaly == pytest.approx(ok.max_anomaly)  # the note changes what is said, not the verdict
    suspect.spec = SimpleNamespace(name="mlp")
    assert back.architecture_note(suspect) == "" and null.architecture_note(suspect) == ""
    with pytest.raises(BackdoorLabError, match="images_per_class 10 \\(here 20\\)"):
        NeuralCleanse(calibration=str(model_files / "nc.safetensors"), images_per_class=20).inspect(Variant(11), c)
    r = runner.invoke(app, ["calibrate", "--inspector", "bias-maps", *[a for i in range(4) for a in ("--model", f"clean{i}.pt")],
                            "--data", "clean.npz", "--out", "x.safetensors"])
    assert r.exit_code == 2 and "--inspector neural-cleanse" in r.output and not (model_files / "x.safetensors").exists()
