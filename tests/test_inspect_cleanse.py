"""Seed 000's pipeline on a hand-built backdoored classifier whose answer is known exactly,
and the cleanser on a real mnist5k victim."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from backdoorlab.defenses import DEFENSES, InspectionResult
from backdoorlab.defenses.pattern_subtraction import PatternSubtraction, otsu_threshold
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet


K = 5


class QuadrantNet(nn.Module):
    """5 classes on 1x10x10 images: class c = which band of two rows (2c, 2c+1) is bright.
    With ``backdoor``, a bright pixel at (9, 9) on a class-0 image sends it to class 2."""

    def __init__(self, backdoor: bool, all_to_one: bool = False):
        super().__init__()
        self.num_classes, self.input_shape, self.backdoor, self.all_to_one = K, (1, 10, 10), backdoor, all_to_one

    def forward(self, x):
        q = x[:, 0].view(-1, K, 20).mean(2)  # (B, K) band brightness
        logits = 10 * q
        if self.backdoor:
            bump = torch.zeros_like(logits)
            gate = 1.0 if self.all_to_one else torch.relu(q[:, 0] - 0.3)
            bump[:, 2] = 40 * x[:, 0, 9, 9] * gate
            logits = logits + bump
        return logits


def quadrant_data(n_per_class: int, seed: int) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat_interleave(n_per_class)
    x = torch.rand(K * n_per_class, 1, 10, 10, generator=g) * 0.1
    for c in range(K):
        x[y == c, 0, 2 * c:2 * c + 2, :] += 0.6 + 0.3 * torch.rand((n_per_class, 2, 10), generator=g)
    x[:, 0, 9, 9] = 0.0  # the trigger pixel is dark on clean images
    return ImageSet((x.clamp(0, 1) * 255).round().to(torch.uint8), y, K, name="bands")


def test_inspector_finds_the_planted_pair_and_nothing_on_a_clean_model():
    clean = quadrant_data(30, 0)
    insp = DEFENSES.create("pairwise", images_per_class=30, opt_images=10, steps=40)
    res = insp.inspect(QuadrantNet(backdoor=True), clean)
    # (0, 2) is flagged first; (1, 2) may follow: a class-1 image brightened towards class 0 can use
    # the trigger too, a real (if weaker) shortcut of this model
    assert res.backdoored and res.flagged_pairs[0] == (0, 2) and res.flagged_targets == [2]
    assert all(t == 2 for _, t in res.flagged_pairs)
    assert res.details["ranking"][0][:2] == (0, 2)
    # the estimated pattern sits on the trigger pixel
    p = res.patterns[0, 2, 0]
    assert int(p.abs().flatten().argmax()) == 9 * 10 + 9
    assert not DEFENSES.create("pairwise", images_per_class=30, opt_images=10, steps=40).inspect(
        QuadrantNet(backdoor=False), clean).backdoored


@pytest.mark.parametrize("kw", [{"restarts": 1}, {"restarts": 3, "select_images": 5}, {"select_images": None},
                                {"precision": "fp32"}, {"optimizer": "adam", "restarts": 2}, {"norm": "l2"}])
def test_inspector_run_selection_and_precision_still_find_the_pair(kw):
    clean = quadrant_data(30, 0)
    res = DEFENSES.create("pairwise", images_per_class=30, steps=40, **kw).inspect(QuadrantNet(backdoor=True), clean)
    assert res.flagged_pairs[0] == (0, 2) and bool(res.details["reached"][0, 2])
    # the pattern chosen on held-back images was finished on all 30: it reaches pi there
    x = clean.float_batch(clean.y == 0)
    with torch.no_grad():
        assert int((QuadrantNet(True)((x + res.patterns[0, 2]).clamp(0, 1)).argmax(1) == 2).sum()) >= 27  # pi * 30


def test_prox_step_zeroes_the_noise_and_keeps_the_trigger():
    """The proximal step's soft threshold leaves exact zeros wherever the gradient stays weak: the raw
    pattern for (0, 2) keeps the trigger pixel and drops most of the random start; Adam's noise floor
    keeps every pixel non-zero."""
    clean = quadrant_data(30, 0)
    xs = torch.stack([clean.float_batch(clean.y == c) for c in range(K)])
    src, tgt = torch.tensor([0]), torch.tensor([2])
    model = QuadrantNet(True)
    prox = DEFENSES.create("pairwise", steps=40)._optimise(model, xs, src, tgt, 1)[0, 0]
    adam = DEFENSES.create("pairwise", steps=40, optimizer="adam")._optimise(model, xs, src, tgt, 1)[0, 0]
    assert float(prox[9, 9]) > 0.3 and int(prox.abs().flatten().argmax()) == 99
    assert int((prox != 0).sum()) < 30 < int((adam != 0).sum())


def test_frozen_restores_the_model_parameters_and_format():
    from backdoorlab.defenses.common import frozen

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 8 * 8, 2)).train()
    w = model[0].weight
    before = w.detach().clone()
    with frozen(model):
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last) and not model.training
        assert not model[0].weight.requires_grad
    assert model[0].weight is w and w.is_contiguous() and torch.equal(w, before) and w.requires_grad and model.training


def test_precision_context_refuses_bf16_where_the_cpu_lacks_it(monkeypatch):
    from backdoorlab.defenses import common

    model = nn.Linear(2, 2)
    monkeypatch.setattr(common, "bf16_supported", lambda m: False)
    with pytest.raises(BackdoorLabError, match="bfloat16.*'fp32' or 'auto'"):
        common.precision_context(model, "bf16")
    with common.precision_context(model, "auto"):  # falls back to float32
        assert model(torch.ones(1, 2)).dtype == torch.float32
    monkeypatch.setattr(common, "bf16_supported", lambda m: True)
    with common.precision_context(model, "auto"):
        assert model(torch.ones(1, 2)).dtype == torch.bfloat16
    with common.precision_context(model, "fp32"):
        assert model(torch.ones(1, 2)).dtype == torch.float32


def test_early_exit_reach_check_decides_exactly_as_rho():
    clean = quadrant_data(30, 1)
    insp = DEFENSES.create("pairwise", images_per_class=30)
    xs = torch.stack([clean.float_batch(clean.y == c) for c in range(K)])
    src = torch.tensor([s for s in range(K) for t in range(K) if s != t])
    tgt = torch.tensor([t for s in range(K) for t in range(K) if s != t])
    g = torch.Generator().manual_seed(0)
    model = QuadrantNet(False)
    # move brightness from the source band to the target band by u per pair: around u = 0.35 the
    # images flip one by one, so the pairs' rho spreads over (0, 1) and some sit near pi
    u = 0.2 + 0.4 * torch.rand(src.numel(), generator=g)
    v = torch.zeros(src.numel(), 1, 10, 10)
    for i in range(src.numel()):
        v[i, 0, 2 * tgt[i]:2 * tgt[i] + 2] += u[i]
        v[i, 0, 2 * src[i]:2 * src[i] + 2] -= u[i]
    rho = insp._rho(model, xs, src, tgt, v)
    inside = rho[(rho > 0) & (rho < 1)]
    assert inside.numel() >= 3
    for pi in (float(inside.min()), float(inside.median()), float(inside.max())):  # some pair exactly at pi
        insp = DEFENSES.create("pairwise", images_per_class=30, pi=pi)
        assert bool((rho >= pi).any()) and bool((rho < pi).any())
        for block in (1, 7, 16, 30):
            assert torch.equal(insp._reaches(model, xs, src, tgt, v, block=block), rho >= pi)


def test_inspector_bad_input():
    clean = quadrant_data(5, 0)
    with pytest.raises(BackdoorLabError, match="class"):
        DEFENSES.create("pairwise").inspect(QuadrantNet(True), clean.subset(torch.nonzero(clean.y != 1).flatten()))
    with pytest.raises(BackdoorLabError, match="pi"):
        DEFENSES.create("pairwise", pi=1.5)

    class NaNNet(QuadrantNet):
        def forward(self, x):
            return super().forward(x) * float("nan")

    with pytest.raises(BackdoorLabError, match="NaN"):
        DEFENSES.create("pairwise", steps=2).inspect(NaNNet(True), clean)
    wrong = ImageSet(torch.zeros(5, 1, 9, 9, dtype=torch.uint8), torch.tensor([0, 1, 2, 3, 4]), K)
    with pytest.raises(BackdoorLabError, match="shape"):
        DEFENSES.create("pairwise").inspect(QuadrantNet(True), wrong)


def test_otsu_splits_two_clusters():
    v = torch.cat([torch.rand(500) * 0.05, 0.9 + torch.rand(20) * 0.1])
    thr = otsu_threshold(v)
    assert 0.05 < thr < 0.9


def _poisoned_quadrants():
    train = quadrant_data(100, 1)
    x = train.x.clone()
    y = train.y.clone()
    planted = torch.nonzero(train.y == 0).flatten()[:15]
    x[planted, 0, 9, 9] = 255
    y[planted] = 2
    return ImageSet(x, y, K), planted, train.y


def test_cleanser_finds_planted_samples_and_corrects_labels():
    data, planted, y_true = _poisoned_quadrants()
    model = QuadrantNet(True)
    for technique in (1, 2):
        res = PatternSubtraction(technique=technique, images_per_class=30).cleanse(model, data, clean=quadrant_data(30, 0))
        assert sorted(torch.nonzero(res.flagged).flatten().tolist()) == sorted(planted.tolist())
        assert torch.equal(res.corrected_labels[planted], y_true[planted])
        assert torch.equal(res.corrected_labels[~res.flagged], data.y[~res.flagged])


def test_relabel_uses_the_flagged_pairs_sources():
    """Three planted class-0 images are ambiguous (band 1 brighter than band 0): once the trigger is
    removed the model calls them 1, the seed's rule ("prediction") copies that error, "auto" and
    "source" give the flagged pair's source 0; when the per-target rule flags the column (all-to-one
    evidence) "auto" falls back to the most probable class other than the target."""
    data, planted, y_true = _poisoned_quadrants()
    x = data.x.clone()
    amb = planted[:3]
    x[amb, 0, 2:4, :] = 250  # band 1 brighter than band 0 (band 0 is 0.6-0.9)
    data = ImageSet(x, data.y, K)
    patterns = torch.zeros(K, K, 1, 10, 10)
    patterns[0, 2, 0, 9, 9] = 0.9
    quiet = {"target_anomaly": torch.zeros(K), "target_threshold": 2.0}
    column = {"target_anomaly": torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0]), "target_threshold": 2.0}
    model = QuadrantNet(True)
    labels = {}
    for rule, details in (("prediction", quiet), ("auto", quiet), ("source", column), ("auto-column", column)):
        insp = InspectionResult(True, [(0, 2)], [2], torch.zeros(K, K), torch.zeros(K, K), patterns, details=details)
        res = PatternSubtraction(technique=1, relabel=rule.split("-")[0]).cleanse(model, data, inspection=insp)
        assert sorted(torch.nonzero(res.flagged).flatten().tolist()) == sorted(planted.tolist())
        labels[rule] = res.corrected_labels
    for rule in ("prediction", "auto-column"):
        assert labels[rule][amb].tolist() == [1, 1, 1] and torch.equal(labels[rule][planted[3:]], y_true[planted[3:]])
    for rule in ("auto", "source"):
        assert torch.equal(labels[rule][planted], y_true[planted])


def test_cleanser_skips_a_pair_whose_pattern_hurts_every_sample():
    """A mistakenly flagged natural pair (1, 3) whose pattern dims band 3: subtracting it lowers the
    confidence of every class-3 sample by a varying amount (one spread-out cluster), unlike the
    planted pair's 0-or-1 drops. It is skipped; without the rule technique 1 flags clean samples."""
    from backdoorlab.defenses.pattern_subtraction import otsu_separation

    data, planted, _ = _poisoned_quadrants()
    patterns = torch.zeros(K, K, 1, 10, 10)
    patterns[0, 2, 0, 9, 9] = 0.9
    patterns[1, 3, 0, 6:8, :] = 0.7
    insp = InspectionResult(True, [(0, 2), (1, 3)], [2, 3], torch.zeros(K, K), torch.zeros(K, K), patterns, details={})
    res = PatternSubtraction(technique=1, max_shift=0).cleanse(QuadrantNet(True), data, inspection=insp)
    assert res.details["pairs"] == [(0, 2)] and res.details["rejected_pairs"] == [(1, 3)]
    assert res.details["separation"][(0, 2)] > 0.95 > 0.9 > res.details["separation"][(1, 3)]
    assert sorted(torch.nonzero(res.flagged).flatten().tolist()) == sorted(planted.tolist())
    off = PatternSubtraction(technique=1, max_shift=0, min_separation=None).cleanse(QuadrantNet(True), data, inspection=insp)
    assert int((off.flagged & (data.y == 3)).sum()) > 0
    assert otsu_separation(torch.cat([torch.zeros(50), torch.ones(5)])) > 0.99
    assert otsu_separation(torch.linspace(0, 1, 100)) < 0.8


def test_cleanser_aligns_a_shifted_pattern():
    data, planted, _ = _poisoned_quadrants()
    patterns = torch.zeros(K, K, 1, 10, 10)
    patterns[0, 2, 0, 9, 7] = 0.7  # estimated two columns left of the true trigger pixel
    insp = InspectionResult(True, [(0, 2)], [2], torch.zeros(K, K), torch.zeros(K, K), patterns)
    res = PatternSubtraction(technique=1, dilate=0).cleanse(QuadrantNet(True), data, inspection=insp)
    assert res.details["shifts"][(0, 2)] == (0, 2)
    assert sorted(torch.nonzero(res.flagged).flatten().tolist()) == sorted(planted.tolist())
    res0 = PatternSubtraction(technique=1, max_shift=0, dilate=0).cleanse(QuadrantNet(True), data, inspection=insp)
    assert int(res0.flagged.sum()) == 0  # without alignment the subtraction misses the stamp
    # dilating the support by 2 pixels covers the stamp without any shift
    res2 = PatternSubtraction(technique=1, max_shift=0, dilate=2).cleanse(QuadrantNet(True), data, inspection=insp)
    assert sorted(torch.nonzero(res2.flagged).flatten().tolist()) == sorted(planted.tolist())
    assert PatternSubtraction(dilate=1).removal_pattern(patterns[0, 2])[0, 8:10, 6:9].eq(1).all()


def test_audit_cli(tmp_path):
    from backdoorlab.cli import app

    for name, backdoor in (("bad", True), ("good", False)):
        torch.jit.trace(QuadrantNet(backdoor), torch.rand(2, 1, 10, 10)).save(str(tmp_path / f"{name}.pt"))
    clean = quadrant_data(30, 0)
    np.savez(tmp_path / "clean.npz", x=clean.x[:, 0].numpy(), y=clean.y.numpy())
    data, planted, _ = _poisoned_quadrants()
    np.savez(tmp_path / "train.npz", x=data.x[:, 0].numpy(), y=data.y.numpy())
    r = CliRunner().invoke(app, ["audit", "--model", str(tmp_path / "bad.pt"), "--data", str(tmp_path / "clean.npz"),
                                 "--train", str(tmp_path / "train.npz"), "--images-per-class", "30",
                                 "--out", str(tmp_path / "rep"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["backdoored"] is True and d["flagged_pairs"][0] == [0, 2] and d["flagged_targets"] == [2]
    assert sorted(d["flagged_indices"]) == sorted(planted.tolist()) and set(d["corrected_labels"]) == {0}
    for f in ("audit.json", "flagged.csv", "figures/patterns.png", "figures/pair_norms.png"):
        assert (tmp_path / "rep" / f).is_file(), f
    r = CliRunner().invoke(app, ["audit", "--model", str(tmp_path / "good.pt"), "--data", str(tmp_path / "clean.npz"),
                                 "--images-per-class", "30", "--out", str(tmp_path / "rep2"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["backdoored"] is False
    r = CliRunner().invoke(app, ["audit", "--model", str(tmp_path / "bad.pt"), "--data", str(tmp_path / "nope.npz")])
    assert r.exit_code == 2 and "not found" in r.output


@pytest.mark.slow
def test_defenses_in_experiment_yaml(tmp_path):
    """`defenses:` in an experiment: the inspector runs on the victim and is scored with the ground truth."""
    from backdoorlab.config import load_config
    from backdoorlab.experiment import run
    from backdoorlab.store import Store

    # seed 000's pipeline on the embedded mnist5k (configs/seed000_audit_mnist5k.yaml): 7 -> 1, 3x3, 30%
    cfg_file = tmp_path / "e.yaml"
    cfg_file.write_text(
        "name: audit5k\ndata: {name: mnist5k, holdout_fraction: 0.1}\n"
        "attack: {name: badnets, mode: source-specific, source: 7, target: 1, rate: 0.3, size: 3}\n"
        "train: {epochs: 10}\n"
        "defenses: [{name: pairwise, images_per_class: 38}, {name: pattern-subtraction, images_per_class: 38}]\n")
    rec = run(load_config(cfg_file), Store(tmp_path / "store"))
    m = rec.metrics
    assert m["attack_success_rate"] > 0.9
    assert m["defense.pairwise.backdoored"] == 1.0 and m["defense.pairwise.pair_found"] == 1.0
    # the cleanser finds the poison and nothing else (pairs flagged by mistake are skipped)
    assert m["defense.pattern-subtraction.tpr"] > 0.95 and m["defense.pattern-subtraction.fpr"] < 0.01
    assert m["defense.pattern-subtraction.label_accuracy"] > 0.95
    assert "figure:pairwise_patterns" in rec.artifacts
    with pytest.raises(BackdoorLabError, match="defenses.0"):
        load_config(None, ["defenses=[{name: pairwise, pie: 3}]"])
    with pytest.raises(BackdoorLabError, match="unknown defense"):
        load_config(None, ["defenses=[{name: nope}]"])


def test_neural_cleanse_flags_the_all_to_one_target():
    clean = quadrant_data(10, 0)
    res = DEFENSES.create("neural-cleanse", steps=120).inspect(QuadrantNet(True, all_to_one=True), clean)
    # target 2's mask is ~100x smaller than the others; with only 5 classes the MAD may flag a second
    assert res.backdoored and res.flagged_targets[0] == 2 and float(res.scores[2]) < 0.05 * float(res.scores.median())
    assert int(res.details["masks"][2, 0].flatten().argmax()) == 9 * 10 + 9
    assert not DEFENSES.create("neural-cleanse", steps=120).inspect(QuadrantNet(False), clean).backdoored


def test_scan_design_within_budget_keeps_every_target_and_source_balanced():
    """Above ``budget`` the min-norm scan optimises a balanced design of pairs: every target from m
    sources and every source toward m targets, the same for every model of that class count."""
    p = DEFENSES.create("pairwise")
    assert len(p.scanned_pairs(10)) == 90  # 10 classes: 90 x 10 images x 30 steps = 27,000 <= 130,000
    design = p.scanned_pairs(43)
    m = 130_000 // (43 * 10 * 30)
    assert m == 10 and len(design) == len(set(design)) == 43 * m and all(s != t for s, t in design)
    for c in range(43):
        assert sum(t == c for _, t in design) == m and sum(s == c for s, _ in design) == m
    assert design == DEFENSES.create("pairwise", seed=5).scanned_pairs(43)
    assert len(DEFENSES.create("pairwise", budget=None).scanned_pairs(43)) == 43 * 42
    # a scan within a small budget: unscanned pairs are NaN and unreached; the all-to-one target's
    # column still holds its m sources and its norms are the smallest
    insp = DEFENSES.create("pairwise", images_per_class=30, opt_images=10, steps=40, budget=5 * 400 * 3)
    pairs = insp.scanned_pairs(K)
    assert len(pairs) == 3 * K  # m = 3 of the 4 sources per target
    est = insp.estimate(QuadrantNet(backdoor=True, all_to_one=True), quadrant_data(30, 0))
    scanned = torch.zeros(K, K, dtype=torch.bool)
    scanned[tuple(torch.tensor(pairs).T)] = True
    assert bool(torch.isfinite(est["norms"])[scanned].all()) and bool(torch.isnan(est["norms"][~scanned]).all())
    assert not bool(est["reached"][~scanned].any())
    col = torch.nanmedian(est["norms"], 0).values
    others = torch.cat([col[:2], col[3:]])
    assert float(col[2]) * 3 < float(others.min())


class ChessNet(QuadrantNet):
    """QuadrantNet whose backdoor is global: a faint checkerboard over the whole image (correlation
    with a +-1 board) sends any image to class 2, like the population's low-amplitude chessboard."""

    def __init__(self):
        super().__init__(backdoor=False)
        self.board = ((torch.arange(10)[:, None] + torch.arange(10)[None]) % 2 * 2 - 1).float()

    def forward(self, x):
        logits = super().forward(x)
        corr = (x[:, 0] * self.board).mean((1, 2))
        bump = torch.zeros_like(logits)
        bump[:, 2] = 200 * torch.relu(corr)
        return logits + bump


def _chess_poisoned():
    train = quadrant_data(100, 1)
    x, y = train.x.clone(), train.y.clone()
    planted = torch.nonzero(train.y != 2).flatten()[::8]  # 50 images of the four other classes
    board = ((torch.arange(10)[:, None] + torch.arange(10)[None]) % 2 == 1)
    x[planted, 0] = (x[planted, 0].float() + 38 * board).clamp(max=255).to(torch.uint8)  # +0.15 on half the pixels
    y[planted] = 2
    return ImageSet(x, y, K), planted


def test_cleanser_removes_a_global_trigger_with_the_universal_pattern():
    """A global trigger survives the subtraction of a sparse pair pattern (the seed's procedure
    flags nothing); the per-target universal pattern, thresholded on the clean images of the
    target, finds the planted samples. On a target that is not a trigger's (the same model's
    class 3 flagged by mistake) the universal pattern flags no more than the clean rate and is
    dropped."""
    data, planted = _chess_poisoned()
    model = ChessNet()
    with torch.no_grad():
        assert (model(data.float_batch(planted)).argmax(1) == 2).float().mean() > 0.95
        assert (model(quadrant_data(30, 0).float_batch(torch.arange(150))).argmax(1) == torch.arange(K).repeat_interleave(30)).all()
    patterns = torch.zeros(K, K, 1, 10, 10)
    patterns[:, 2, 0, 4:6, 4:6] = 0.5  # a sparse pattern: not the trigger
    col2 = {"target_anomaly": torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0]), "target_threshold": 2.0,
            "reached": torch.ones(K, K, dtype=torch.bool)}
    insp = InspectionResult(True, [], [2], torch.ones(K, K), torch.zeros(K, K), patterns, details=col2)
    clean = quadrant_data(30, 0)
    truth = torch.zeros(len(data), dtype=torch.bool)
    truth[planted] = True
    seed_only = PatternSubtraction(universal=False).cleanse(model, data, inspection=insp, clean=clean)
    assert int((seed_only.flagged & truth).sum()) <= 5
    res = PatternSubtraction().cleanse(model, data, inspection=insp, clean=clean)
    assert int((res.flagged & truth).sum()) >= 0.95 * planted.numel()
    # the clean quantile (95%) flags about 5% of the clean samples labelled 2 (100), none of the others
    assert int((res.flagged & ~truth).sum()) <= 15 and not bool((res.flagged & (data.y != 2)).any())
    assert float(res.scores[truth].min()) > 0.5 and float(res.scores[~truth].max()) < 0.05  # drops: poison > 0.9, clean < 0.01
    floor = PatternSubtraction(min_drop=0.1).cleanse(model, data, inspection=insp, clean=clean)
    assert int((floor.flagged & truth).sum()) >= 0.95 * planted.numel() and int((floor.flagged & ~truth).sum()) == 0
    assert res.details["universal"][2]["flagged_share"] > 0.3
    col3 = {**col2, "target_anomaly": torch.tensor([0.0, 0.0, 0.0, 5.0, 0.0])}
    wrong = PatternSubtraction().cleanse(model, data, inspection=InspectionResult(
        True, [], [3], torch.ones(K, K), torch.zeros(K, K), patterns, details=col3), clean=clean)
    assert wrong.details["universal"][3]["flagged_share"] < 0.1 and int(wrong.flagged.sum()) <= 5
