"""Cleansers on poisoned training sets, beside IBM ART's, and SCALE-UP beside STRIP.

    python benchmarks/bench_cleansers.py --part train      # the cached victims (run once; each < 8 min)
    python benchmarks/bench_cleansers.py --part cleansers  # TPR / FPR / AUROC per cleanser, ART's on the same features
    python benchmarks/bench_cleansers.py --part scale-up   # FRR / FAR / AUROC, inputs/s, beside STRIP

Setting: full MNIST (57,000 train, 3,000 clean held-out, 10,000 test; benchmarks/_victims.py), the
``cnn``, 5 epochs, seed 0; BadNets 3x3 white patch bottom-right and a noise blend (alpha 0.2), both
all-to-one -> 0 on 10% of the non-target training images (the target class is then about half
poison); a clean model of the same training for the false alarms. Every cleanser reads the
penultimate activations of the model trained on the poisoned set; IBM ART's ActivationDefence and
SpectralSignatureDefense get the very same activations (its classifier's ``get_activations`` is
replaced by a lookup of ours), so only the algorithms differ. ART (``adversarial-robustness-toolbox``,
the ``bench`` extra) is used here only, never by the library.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np
import torch

from _common import header, need_shared
from _victims import CACHE, victim

from backdoorlab import metrics as M
from backdoorlab.attacks import poison
from backdoorlab.defenses import DEFENSES
from backdoorlab.defenses._features import penultimate_features
from backdoorlab.models import ModelSpec, build_model, load_model, save_model
from backdoorlab.train import TrainConfig, evaluate, train

OURS = [
    ("activation-clustering", {"reduce": "ica"}, "AC: ICA 10, silhouette, far-from-clean"),
    ("activation-clustering", {"reduce": "ica", "suspicious_cluster": "smaller"}, "AC: ICA 10, silhouette, smaller (paper)"),
    ("activation-clustering", {"reduce": "ica", "analysis": "relative-size", "suspicious_cluster": "smaller"},
     "AC: ICA 10, relative size (paper)"),
    ("activation-clustering", {}, "AC: PCA 10, silhouette, far-from-clean (default)"),
    ("activation-clustering", {"reduce": "pca", "analysis": "relative-size", "suspicious_cluster": "smaller"}, "AC: PCA 10, relative size"),
    ("spectral-signatures", {}, "SS: centred at the clean mean (default)"),
    ("spectral-signatures", {"centre": "class"}, "SS: centred at the class mean (paper)"),
    ("spectre", {}, "SPECTRE: clean-referenced whitening, clean 1% threshold (default)"),
    ("spectre", {"reference": "data"}, "SPECTRE: robust estimate from the class, 1.5 eps quota (paper)"),
    ("pattern-subtraction", {}, "pattern subtraction (seed 000, pairwise scan on the held-out set)"),
]
EXCLUSIONARY = ("activation-clustering", {"analysis": "exclusionary", "reduce": "pca", "reclassify_epochs": 2},
                "AC: PCA 10, exclusionary reclassification (2-epoch retraining)")


def poisoned_train(v, seed: int = 0):
    """The poisoned training set the cached victim was trained on (benchmarks/_victims.py draws it so)."""
    return poison(v.splits.train, v.attack, rate=0.1, target=0, generator=torch.Generator().manual_seed(seed + 1))


def clean_model(v, epochs: int = 5, seed: int = 0):
    """The victim's architecture trained on the clean training split (cached)."""
    path = CACHE / f"mnist-clean-cnn-e{epochs}-s{seed}.safetensors"
    if path.is_file():
        return load_model(path).eval(), -1.0
    torch.manual_seed(seed)
    net = build_model(ModelSpec("cnn", 10, v.splits.train.shape))
    t0 = time.perf_counter()
    train(net, v.splits.train, TrainConfig(epochs=epochs), seed=seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    save_model(net, path)
    return net.eval(), time.perf_counter() - t0


def rates(flagged, scores, truth) -> dict:
    return {"tpr": M.tpr(flagged, truth), "fpr": M.fpr(flagged, truth), "auroc": M.auroc(scores, truth),
            "flagged": int(flagged.sum())}


def art_results(feats: torch.Tensor, y: torch.Tensor, truth: torch.Tensor, k: int) -> list[tuple[str, dict]]:
    """ART's activation clustering (each cluster analysis) and spectral signatures on our features."""
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense
    from art.estimators.classification import PyTorchClassifier

    x = feats.numpy().astype(np.float32)
    onehot = np.eye(k, dtype=np.float32)[y.numpy()]
    clf = PyTorchClassifier(torch.nn.Linear(x.shape[1], k), loss=torch.nn.CrossEntropyLoss(), input_shape=(x.shape[1],),
                            nb_classes=k)
    clf.get_activations = lambda xx, layer=None, batch_size=128, framework=False: xx  # the features are the inputs
    out = []
    for analysis in ("smaller", "relative-size", "silhouette-scores", "distance"):
        t0 = time.perf_counter()
        d = ActivationDefence(clf, x, onehot)
        d._get_activations = lambda x_train=None: x  # noqa: B023 - the same features for every analysis
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, is_clean = d.detect_poison(nb_clusters=2, nb_dims=10, reduce="FastICA", cluster_analysis=analysis)
        except Exception as exc:  # noqa: BLE001 - ART 1.20's relative-size analysis fails on numpy 2
            print(f"   ART AC {analysis}: failed ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        flagged = torch.tensor(is_clean) == 0
        out.append((f"ART AC: FastICA 10, {analysis}", {**rates(flagged, flagged.float(), truth),
                                                         "seconds": time.perf_counter() - t0}))
    for pp in (0.1, 0.33):
        t0 = time.perf_counter()
        d = SpectralSignatureDefense(clf, x, onehot, expected_pp_poison=pp, eps_multiplier=1.5)
        report, is_clean = d.detect_poison()
        flagged = torch.tensor(is_clean) == 0
        out.append((f"ART SS: expected_pp_poison {pp}", {**rates(flagged, flagged.float(), truth),
                                                         "seconds": time.perf_counter() - t0}))
    return out


def run_cleansers(triggers: list[str], exclusionary: bool, art: bool) -> dict:
    results: dict = {}
    for trig in triggers:
        v = victim("mnist", trig)
        print(v.describe())
        data = poisoned_train(v)
        truth = data.is_poison
        seen = data.without_ground_truth()
        print(f"   poisoned {int(truth.sum())} of {len(data)}; target class 0 holds {int((data.y == 0).sum())} "
              f"({float(truth[data.y == 0].float().mean()):.2f} poison)")
        rows = []
        for name, params, label in OURS + ([EXCLUSIONARY] if exclusionary else []):
            t0 = time.perf_counter()
            res = DEFENSES.build(name, params, where=name).cleanse(v.model, seen, clean=v.splits.holdout)
            rows.append((label, {**rates(res.flagged, res.scores, truth), "seconds": time.perf_counter() - t0}))
            print(f"   {label:70s} " + _fmt(rows[-1][1]), flush=True)
        if art:
            feats, _ = penultimate_features(v.model, data.x)
            for label, r in art_results(feats, data.y, truth, 10):
                rows.append((label, r))
                print(f"   {label:70s} " + _fmt(r), flush=True)
        results[trig] = rows
    return results


def run_clean_false_alarms(exclusionary: bool) -> dict:
    v = victim("mnist", "patch")
    net, sec = clean_model(v)
    print(f"clean cnn on the clean training split ({len(v.splits.train)}), CA {evaluate(net, v.splits.test):.4f}"
          + ("" if sec < 0 else f", trained in {sec:.0f} s"))
    rows = []
    for name, params, label in OURS + ([EXCLUSIONARY] if exclusionary else []):
        t0 = time.perf_counter()
        res = DEFENSES.build(name, params, where=name).cleanse(net, v.splits.train, clean=v.splits.holdout)
        r = {"flagged_share": float(res.flagged.float().mean()), "flagged": int(res.flagged.sum()),
             "seconds": time.perf_counter() - t0}
        rows.append((label, r))
        print(f"   {label:70s} flagged {r['flagged']} ({r['flagged_share']:.4f}), {r['seconds']:.1f} s", flush=True)
    return {"clean": rows}


def run_detectors(n_inputs: int) -> dict:
    out: dict = {}
    dets = [("scale-up", {}, "SCALE-UP vanilla (SPC > 0.5, no clean data)"),
            ("scale-up", {"standardise": True}, "SCALE-UP data-limited (standardised, > 2)"),
            ("scale-up", {"threshold_rule": "quantile", "frr": 0.05}, "SCALE-UP, threshold at the clean 95% quantile"),
            ("strip", {}, "STRIP (N 20, frr 0.01)")]
    models = [(trig, victim("mnist", trig)) for trig in ("patch", "blend")]
    sub = torch.randperm(10000, generator=torch.Generator().manual_seed(0))[:n_inputs]
    for key, v in models + [("clean model", None)]:
        if v is None:
            v0 = models[0][1]
            net, _ = clean_model(v0)
            test, trig, hold = v0.splits.test, v0.triggered, v0.splits.holdout
        else:
            net, test, trig, hold = v.model, v.splits.test, v.triggered, v.splits.holdout
        test, trig = test.subset(sub[sub < len(test)]), trig.subset(sub[sub < len(trig)])
        print(f"{key}: {len(test)} clean test inputs, {len(trig)} triggered (patch trigger for the clean model)")
        rows = []
        for name, params, label in dets:
            det = DEFENSES.build(name, params, where=name).fit(net, hold)
            t0 = time.perf_counter()
            c = det.detect(test.x)
            g = det.detect(trig.x)
            dt = time.perf_counter() - t0
            s = torch.cat([c.scores, g.scores])
            t = torch.cat([torch.zeros(len(c.scores), dtype=torch.bool), torch.ones(len(g.scores), dtype=torch.bool)])
            r = {"frr": M.frr(c.flagged), "far": M.far(g.flagged), "auroc": M.auroc(s, t),
                 "inputs_per_second": (len(c.scores) + len(g.scores)) / dt}
            rows.append((label, r))
            print(f"   {label:50s} FRR {r['frr']:.4f}  FAR {r['far']:.4f}  AUROC {r['auroc']:.4f}  "
                  f"{r['inputs_per_second']:.0f} inputs/s", flush=True)
        out[key] = rows
    return out


def _fmt(r: dict) -> str:
    return (f"TPR {r['tpr']:.4f}  FPR {r['fpr']:.4f}  AUROC {r['auroc']:.4f}  flagged {r['flagged']:6d}  "
            f"{r['seconds']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["train", "cleansers", "clean", "scale-up"], required=True)
    ap.add_argument("--trigger", choices=["patch", "blend"], action="append", help="default: both")
    ap.add_argument("--exclusionary", action="store_true", help="also AC with exclusionary reclassification (retrains)")
    ap.add_argument("--no-art", action="store_true")
    ap.add_argument("--inputs", type=int, default=2000, help="scale-up: clean and triggered test inputs (a random subset)")
    ap.add_argument("--json", help="write the figures here too")
    a = ap.parse_args()
    need_shared()
    header(f"bench_cleansers --part {a.part}")
    if a.part == "train":
        for trig in a.trigger or ["patch", "blend"]:
            print(victim("mnist", trig).describe())
        net, sec = clean_model(victim("mnist", "patch"))
        print(f"clean model ready ({'cached' if sec < 0 else f'{sec:.0f} s'})")
        return
    if a.part == "cleansers":
        res = run_cleansers(a.trigger or ["patch", "blend"], a.exclusionary, not a.no_art)
    elif a.part == "clean":
        res = run_clean_false_alarms(a.exclusionary)
    else:
        res = run_detectors(a.inputs)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
