"""Seed 002's adversarial bias maps: Algorithms I and II, the comparison with a reference model,
the verdict, bad input, figures and the ``biasmaps`` command.

The real-model test follows the seed's protocol on the embedded mnist5k: a clean CNN (the
reference) is fine-tuned on data where 8s carry a corner patch and are relabelled 9 (the
suspect), or on the clean data alone (the clean suspect, same protocol without poison)."""

import json
from functools import lru_cache

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from backdoorlab.defenses import DEFENSES, InspectionResult
from backdoorlab.defenses.bias_maps import BiasMaps, ifgsm
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

K = 5


class BandNet(nn.Module):
    """5 classes on 1x10x10 images: class c = brightness of rows 2c, 2c+1 in columns 0..7 (minus the
    mean of the other bands). With ``backdoor``, bright pixels in the 2x2 corner (8..9, 8..9), outside
    every band, send any image to class 2."""

    def __init__(self, backdoor: bool):
        super().__init__()
        self.num_classes, self.input_shape, self.backdoor = K, (1, 10, 10), backdoor

    def forward(self, x):
        q = x[:, 0, :, :8].reshape(-1, K, 16).mean(2)
        logits = 10 * (q - q.mean(1, keepdim=True))
        if self.backdoor:
            bump = torch.zeros_like(logits)
            bump[:, 2] = 30 * x[:, 0, 8:, 8:].mean((1, 2))
            logits = logits + bump
        return logits


def band_data(n_per_class: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat_interleave(n_per_class)
    x = torch.rand(K * n_per_class, 1, 10, 10, generator=g) * 0.1
    for c in range(K):
        x[y == c, 0, 2 * c:2 * c + 2, :8] += 0.7
    x[:, 0, 8:, 8:] = 0.0
    return ImageSet((x.clamp(0, 1) * 255).round().to(torch.uint8), y, K, name="bands")


def small(**kw) -> BiasMaps:
    params = dict(samples_per_class=30, pair_samples=6, inputs=("data", "noise"), eps=(0.1,))
    params.update(kw)
    return DEFENSES.create("bias-maps", **params)


def test_ifgsm_moves_images_to_the_target_and_stays_in_range():
    clean = band_data(10, 0)
    x0 = clean.float_batch()
    tgt = torch.full((len(clean),), 3)
    x, pred = ifgsm(BandNet(False), x0, tgt, eps=0.1, iterations=10)
    assert x.shape == x0.shape and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert bool((pred == 3).all())
    # eq. 2 pushes away from the source as well: class 0's band darkens further than under eq. 1
    x2, pred2 = ifgsm(BandNet(False), x0, tgt, eps=0.1, iterations=10, source=torch.zeros_like(tgt))
    assert bool((pred2 == 3).all())
    assert float(x2[:, 0, 0:2].mean()) <= float(x[:, 0, 0:2].mean())


def test_algorithm1_records_under_the_prediction_and_shows_the_trigger():
    clean = band_data(10, 0)
    insp = small(inputs=("data",))
    sus = insp.algorithm1(BandNet(True), clean, "data", 0.1)
    ref = insp.algorithm1(BandNet(False), clean, "data", 0.1)
    assert sus.maps.shape == (K, 1, 10, 10) and int(sus.counts.sum()) == K * 30
    assert float(sus.percent.sum()) == pytest.approx(100.0)
    # every image pushed to a class lands in it on this easy model: 20% per class
    assert torch.allclose(ref.percent, torch.full((K,), 20.0, dtype=torch.float64))
    # the bias map of the backdoor target lights up the (dark on data) trigger corner; the reference's
    # and the other classes' do not (the corner stops growing once the target's softmax saturates)
    corner = sus.maps[:, 0, 8:, 8:].mean((1, 2))
    assert float(corner[2]) > 0.4 and float(corner.max()) == float(corner[2])
    assert float(sorted(corner.tolist())[-2]) < 0.05 and float(ref.maps[:, 0, 8:, 8:].max()) < 0.05
    # blank starts: one deterministic sample per target
    blank = insp.algorithm1(BandNet(True), clean, "blank", 0.1)
    assert int(blank.counts.sum()) == K


def test_inspect_flags_the_target_with_a_reference_and_nothing_on_a_clean_suspect():
    clean = band_data(20, 0)
    for statistic in ("stamp", "euclidean", "local"):
        insp = small(statistic=statistic, stamp_pixels=4)  # the 2x2 trigger in a 10x10 image
        res = insp.inspect(BandNet(True), clean, reference=BandNet(False))
        assert isinstance(res, InspectionResult)
        assert res.backdoored and res.flagged_targets == [2], (statistic, res.anomaly)
        assert res.details["top_class"] == 2 and res.details["reference"] == "model"
        assert res.scores.shape == (K,) and res.anomaly.shape == (K,)
        # Algorithm II: the pairs into the target carry the trigger; the most anomalous pair ends in 2
        pa = res.details["pair_anomaly"].clone()
        assert torch.isnan(pa.diagonal()).all()
        pa[~pa.isfinite()] = -1e9
        assert int(pa.flatten().argmax()) % K == 2
        assert all(t == 2 for _, t in res.flagged_pairs)
        clean_res = insp.inspect(BandNet(False), clean, reference=BandNet(False))
        assert not clean_res.backdoored and clean_res.flagged_targets == [] and clean_res.flagged_pairs == []


def test_no_reference_fallback_runs_and_is_documented_in_the_result():
    clean = band_data(20, 0)
    res = small(pair_samples=0, inputs=("noise",), stamp_pixels=4).inspect(BandNet(True), clean)
    assert res.details["reference"] == "none" and res.details["pair_anomaly"] is None
    # the trigger corner makes class 2's map stand out from the other classes' maps
    assert res.details["top_class"] == 2


def test_bad_input_errors():
    with pytest.raises(BackdoorLabError, match=r"eps must lie in \(0, 1\]"):
        DEFENSES.create("bias-maps", eps=(0.0,))
    with pytest.raises(BackdoorLabError, match=r"eps must lie in \(0, 1\]"):
        DEFENSES.create("bias-maps", eps=(1.5,))
    with pytest.raises(BackdoorLabError, match="iterations must be at least 1"):
        DEFENSES.create("bias-maps", iterations=0)
    with pytest.raises(BackdoorLabError, match="input kind"):
        DEFENSES.create("bias-maps", inputs=())
    clean = band_data(5, 0)

    class Wider(BandNet):
        def __init__(self):
            super().__init__(False)
            self.num_classes = K + 1

        def forward(self, x):
            return torch.cat([super().forward(x), torch.zeros(x.shape[0], 1)], 1)

    with pytest.raises(BackdoorLabError, match="same classes as the suspect"):
        small().inspect(BandNet(True), clean, reference=Wider())

    class Bigger(BandNet):
        def __init__(self):
            super().__init__(False)
            self.input_shape = (1, 12, 12)

    with pytest.raises(BackdoorLabError, match="same kind of images"):
        small().inspect(BandNet(True), clean, reference=Bigger())

    class Plain(nn.Module):  # no num_classes attribute: caught by the probe
        def forward(self, x):
            return torch.zeros(x.shape[0], K + 2)

    with pytest.raises(BackdoorLabError, match="classes"):
        small().inspect(BandNet(True), clean, reference=Plain())
    with pytest.raises(BackdoorLabError, match="not found"):
        small(reference="/nonexistent/ref.safetensors").inspect(BandNet(True), clean)


def test_figures_are_pngs():
    from backdoorlab.plots_biasmaps import figures

    res = small(eps=(0.1, 0.5), inputs=("noise",)).inspect(BandNet(True), band_data(10, 0), reference=BandNet(False))
    figs = figures(res)
    assert {"bias_maps_noise.png", "pair_maps_noise_0.1.png", "pair_maps_noise_0.5.png", "class_distance.png",
            "stamps.png", "class_stamp.png"} <= set(figs)
    assert all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in figs.values())
    figs = figures(small(statistic="euclidean", inputs=("noise",)).inspect(BandNet(True), band_data(10, 0), reference=BandNet(False)))
    assert "class_distance.png" in figs and "stamps.png" not in figs


def test_biasmaps_cli_json(tmp_path):
    from backdoorlab.cli import app

    for name, backdoor in (("bad", True), ("good", False)):
        torch.jit.trace(BandNet(backdoor), torch.rand(2, 1, 10, 10)).save(str(tmp_path / f"{name}.pt"))
    clean = band_data(20, 0)
    np.savez(tmp_path / "clean.npz", x=clean.x[:, 0].numpy(), y=clean.y.numpy())
    args = ["--data", str(tmp_path / "clean.npz"), "--samples", "30", "--pair-samples", "6", "--json"]
    r = CliRunner().invoke(app, ["biasmaps", "--model", str(tmp_path / "bad.pt"), "--reference", str(tmp_path / "good.pt"),
                                 "--out", str(tmp_path / "rep"), *args])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert {"backdoored", "flagged_classes", "class_distance", "flagged_pairs", "seconds"} <= set(d)
    assert d["backdoored"] is True and d["flagged_classes"] == [2] and d["top_class"] == 2
    assert len(d["class_distance"]) == K and d["reference"] == "model" and d["seconds"] > 0
    assert all(p[1] == 2 for p in d["flagged_pairs"])
    for f in ("biasmaps.json", "figures/class_distance.png", "figures/bias_maps_data.png", "figures/pair_maps_noise_0.1.png"):
        assert (tmp_path / "rep" / f).is_file(), f
    r = CliRunner().invoke(app, ["biasmaps", "--model", str(tmp_path / "good.pt"), "--reference", str(tmp_path / "good.pt"),
                                 "--out", str(tmp_path / "rep2"), *args])
    assert r.exit_code == 0 and json.loads(r.stdout)["backdoored"] is False
    r = CliRunner().invoke(app, ["biasmaps", "--model", str(tmp_path / "bad.pt"), "--eps", "2", "--out", str(tmp_path / "r3"), *args])
    assert r.exit_code == 2 and "eps must lie in (0, 1]" in r.output
    assert not (tmp_path / "r3").exists()


@lru_cache(maxsize=1)
def _mnist5k_models():
    """The seed's protocol on mnist5k: a clean CNN, then fine-tuned on poisoned (suspect) or clean data."""
    import copy

    from backdoorlab.attacks import ATTACKS, poison
    from backdoorlab.data import load_source, make_splits
    from backdoorlab.models import ModelSpec, build_model
    from backdoorlab.train import TrainConfig, train

    raw = load_source("mnist5k")
    sp = make_splits(raw.train, None, seed=0, holdout_fraction=0.1)
    torch.manual_seed(0)  # the initial weights: independent of the tests that ran before
    ref = build_model(ModelSpec("cnn", 10, (1, 28, 28), {"width": 16, "hidden": 64}))
    train(ref, sp.train, TrainConfig(epochs=3, warmup=0), seed=0)  # as measured in docs/bias-maps.md (before the warm-up default)
    attack = ATTACKS.create("badnets", size=4, position="top-right", margin=1)
    poisoned = poison(sp.train, attack, rate=0.6, target=9, source=8, mode="source-specific",
                      generator=torch.Generator().manual_seed(1))
    tune = TrainConfig(epochs=1, lr=0.02, warmup=0)  # the seed: a plain 1-epoch fine-tune
    sus, ok = copy.deepcopy(ref), copy.deepcopy(ref)
    train(sus, poisoned.without_ground_truth(), tune, seed=1)
    train(ok, sp.train, tune, seed=1)
    return ref.eval(), sus.eval(), ok.eval(), sp.holdout


def test_mnist5k_patch_backdoor_target_is_flagged_and_clean_finetune_is_not():
    ref, sus, ok, holdout = _mnist5k_models()
    params = dict(inputs=("data", "noise"), eps=(0.1,), samples_per_class=100, pair_samples=0)
    insp = DEFENSES.create("bias-maps", **params, statistic="euclidean")
    maps = {name: insp.model_maps(m, holdout) for name, m in (("ref", ref), ("sus", sus), ("ok", ok))}
    res = insp.compare(maps["sus"], maps["ref"])  # the seed's Euclidean distance
    assert res.details["top_class"] == 9 and res.flagged_targets == [9] and res.backdoored, res.anomaly
    clean_res = insp.compare(maps["ok"], maps["ref"])
    assert clean_res.flagged_targets == [] and not clean_res.backdoored, clean_res.anomaly
    # the local statistic ranks the target (or the source) first as well
    local = DEFENSES.create("bias-maps", **params, statistic="local").compare(maps["sus"], maps["ref"])
    assert local.details["top_class"] in (8, 9), local.anomaly


def test_mnist5k_stamp_statistic_with_an_independent_reference():
    """The issue's harder setting: suspect and reference trained from scratch with different seeds
    (their bias maps differ everywhere). The stamp statistic still names the target; a clean model
    of a third seed is not flagged.

    Both verdicts are asserted with a margin, because the models' float rounding differs between
    CPUs (AVX2 vs AVX-512/AMX kernels) and thread counts, and training amplifies it: with 4 epochs
    and the 400-image holdout as the clean set (source groups of ~40 images, so one image moved is
    one unit of anomaly index at the min_flip / 4 scale floor) the clean model's largest anomaly was
    4.76 (flagged) natively on AMX and 3.0 / 1.14 elsewhere. With 6 epochs and the holdout + test
    split (1,400 images) as the clean set, measured (AVX-512/AMX and AVX2, 1 and 2 threads): clean
    max anomaly 1.18-1.46, suspect's class 9 38.8-39.4 (stamp share 1.0); threshold 3."""
    from backdoorlab.attacks import ATTACKS, poison
    from backdoorlab.data import load_source, make_splits
    from backdoorlab.models import ModelSpec, build_model
    from backdoorlab.train import TrainConfig, train

    raw = load_source("mnist5k")
    sp = make_splits(raw.train, None, seed=0, holdout_fraction=0.1)
    attack = ATTACKS.create("badnets", size=5, position="top-right", margin=1)
    poisoned = poison(sp.train, attack, rate=0.6, target=9, source=8, mode="source-specific",
                      generator=torch.Generator().manual_seed(1)).without_ground_truth()
    models = {}
    for name, data, seed in (("ref", sp.train, 3), ("sus", poisoned, 4), ("ok", sp.train, 5)):
        torch.manual_seed(seed)
        m = build_model(ModelSpec("cnn", 10, (1, 28, 28), {"width": 16, "hidden": 64}))
        train(m, data, TrainConfig(epochs=6), seed=seed)
        models[name] = m.eval()
    # the defender's clean images: every image no model trained on (labels are not read)
    clean = ImageSet(torch.cat([sp.holdout.x, sp.test.x]), torch.cat([sp.holdout.y, sp.test.y]), 10, name="mnist5k-clean")
    insp = DEFENSES.create("bias-maps", inputs=("data",), eps=(0.1,), samples_per_class=100, pair_samples=0)
    res = insp.inspect(models["sus"], clean, reference=models["ref"])
    top = res.details["top_class"]
    assert top in (8, 9) and res.backdoored, res.scores
    assert float(res.anomaly[top]) > 3 * insp.threshold and float(res.scores[top]) >= 0.5, (res.scores, res.anomaly)
    assert res.details["statistic"] == "stamp" and res.details["bias_maps"]["data@0.1"]["stamp"].shape == (10, 1, 28, 28)
    clean_res = insp.inspect(models["ok"], clean, reference=models["ref"])
    assert not clean_res.backdoored, (clean_res.scores, clean_res.anomaly)
    assert float(clean_res.anomaly.max()) < insp.threshold - 1, (clean_res.scores, clean_res.anomaly)
