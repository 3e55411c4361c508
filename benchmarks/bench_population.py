"""Pairwise-audit statistics over a model population (issue 22): which per-model score separates
backdoored from clean models on models the threshold was not fitted on.

Reads a population already run by ``backdoorlab population configs/populations/mnist.yaml`` (the
victims' weights and configs from the store), runs the pairwise scan (50 clean held-out images per
class, the cells' setting) once per model (cached in ``--cache``), and compares scores:

- ``mad``: the inspector's own rule, the largest MAD anomaly index of the log-norm residuals (log
  norm minus its row and column medians) within the model, at its fixed threshold (3) and at a
  threshold fitted on the calibration half;
- ``pair-null``: the library's calibrated verdict (:mod:`backdoorlab.defenses._pair_null`, what
  ``backdoorlab calibrate`` fits): each pair's and each target's residual as a z-score against the
  same pair (target) in the calibration half's clean models, at its leave-one-out thresholds, and
  per trigger kind and architecture.

Calibration half: seed 0's models; evaluation half: seed 1's. Every threshold is fitted on the
calibration half only (the smallest score above every clean calibration model) and reported on the
evaluation half. Usage::

    BACKDOORLAB_DATA=../shared/data BACKDOORLAB_HOME=STORE python benchmarks/bench_population.py [--grid population-mnist]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def scan_population(grid: str, cache: Path, params: dict | None = None) -> list[dict]:
    from backdoorlab.cellstore import CellStore
    from backdoorlab.config import ExperimentConfig
    from backdoorlab.defenses.pairwise import PairwiseTriggerInspector
    from backdoorlab.experiment import prepare
    from backdoorlab.models import load_model
    from backdoorlab.store import Store, default_home

    cache.mkdir(parents=True, exist_ok=True)
    store = Store(default_home())
    cs = CellStore(store)
    rows = [r for r in cs.cells(grid) if r.defense == "none" and r.status == "done"]
    recs = cs.records(rows)
    out = []
    for i, r in enumerate(rows):
        rec = recs[r.cell_id]
        tag = "".join(f"-{k}={v}" for k, v in sorted((params or {}).items()))
        f = cache / f"{r.cell_id[:16]}{tag}.pt"
        if not f.is_file():
            cfg = ExperimentConfig.model_validate(rec.config)
            prep = prepare(cfg)
            model = load_model(Path(rec.run_dir) / "weights.safetensors", num_classes=prep.train_set.num_classes,
                               input_shape=prep.train_set.shape)
            t0 = time.perf_counter()
            est = PairwiseTriggerInspector(images_per_class=50, **(params or {})).estimate(model, prep.splits.holdout)
            torch.save({"norms": est["norms"], "reached": est["reached"]}, f)
            print(f"[{i + 1}/{len(rows)}] {r.data}/{r.model}/{r.attack}/seed{r.seed}: {time.perf_counter() - t0:.1f} s",
                  flush=True)
        d = torch.load(f)
        a = rec.config.get("attack") or {}
        out.append({"data": r.data, "model": r.model, "attack": r.attack, "seed": r.seed, "norms": d["norms"],
                    "reached": d["reached"], "target": a.get("target"), "source": a.get("source"),
                    "mode": a.get("mode"), "asr": rec.metrics.get("attack_success_rate")})
    return out


def score_mad(m: dict) -> tuple[float, set[int]]:
    """The inspector's own MAD rule: (largest anomaly index, targets of the pairs above 3 or targets above 2)."""
    from backdoorlab.defenses.pairwise import mad_rule

    a, ta = mad_rule(m["norms"])
    a[~m["reached"]] = float("nan")
    named = {int(t) for _, t in torch.nonzero(torch.nan_to_num(a, nan=-1.0) > 3.0).tolist()}
    named |= {int(t) for t in torch.nonzero(ta > 2.0).flatten().tolist()}
    return float(torch.nan_to_num(a, nan=-1e9).max()), named


def score_null(null, m: dict) -> tuple[float, set[int]]:
    """The library's calibrated verdict (PairNull): (score in units of the threshold, named targets)."""
    pz, cz = null.zscores(m["norms"], m["reached"])
    named = {int(t) for _, t in torch.nonzero(torch.nan_to_num(pz, nan=-1.0) > null.threshold).tolist()}
    named |= {int(t) for t in torch.nonzero(cz > null.target_threshold).flatten().tolist()}
    return null.score(m["norms"], m["reached"]), named


def evaluate(models: list[dict], name: str, fn, own_threshold: float | None = None) -> dict:
    """AUROC / TPR@5% on the evaluation half; verdicts at a threshold fitted on the calibration half's
    clean models (or ``own_threshold``, the method's fixed one)."""
    from backdoorlab import metrics as M
    from backdoorlab.population import calibrated_threshold, tpr_at_fpr

    cal = [m for m in models if m["seed"] == 0]
    ev = [m for m in models if m["seed"] != 0]
    thr = own_threshold if own_threshold is not None else calibrated_threshold(
        [fn(m)[0] for m in cal if m["attack"] == "none"])
    sc = [fn(m) for m in ev]
    s = torch.nan_to_num(torch.tensor([x for x, _ in sc], dtype=torch.float64), nan=-1e9, posinf=1e9, neginf=-1e9)
    t = torch.tensor([m["attack"] != "none" for m in ev])
    flagged = s >= thr if own_threshold is None else s > thr
    named = torch.tensor([m["attack"] != "none" and m["target"] in tg for (_, tg), m in zip(sc, ev)])
    extra = torch.tensor([len(tg - {m["target"]}) for (_, tg), m in zip(sc, ev)], dtype=torch.float64)
    return {"statistic": name, "auroc": M.auroc(s, t), "tpr@5%fpr": tpr_at_fpr(s, t, 0.05), "threshold": thr,
            "false_alarms": f"{int((flagged & ~t).sum())}/{int((~t).sum())}", "tpr": float(flagged[t].float().mean()),
            "found": float((flagged & named)[t].float().mean()),
            "other_targets_named": float(extra[t & flagged].median()) if bool((t & flagged).any()) else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="population-mnist")
    ap.add_argument("--cache", type=Path, default=Path("population-scans"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--set", action="append", default=[], help="a pairwise parameter for the scans, e.g. formulation=mask")
    args = ap.parse_args()
    from backdoorlab.runtime import tune_allocator

    tune_allocator()
    params = dict(p.split("=", 1) for p in args.set)
    params = {k: (int(v) if v.isdigit() else v) for k, v in params.items()}
    models = scan_population(args.grid, args.cache, params)
    learned = [m for m in models if m["attack"] == "none" or (m["asr"] or 0) >= 0.5]  # attacks that took
    print(f"{len(models)} models ({sum(m['attack'] == 'none' for m in models)} clean); "
          f"{len(models) - len(learned)} backdoored ones with ASR < 0.5 left out")
    from backdoorlab.defenses._pair_null import fit

    cal_clean = [m for m in learned if m["seed"] == 0 and m["attack"] == "none"]
    null = fit([m["norms"] for m in cal_clean], [m["reached"] for m in cal_clean], (1, 28, 28), "calibration half")
    print(f"null: {null.describe()}")
    rows = [evaluate(learned, "mad rule (fixed threshold 3 / 2)", score_mad, own_threshold=3.0),
            evaluate(learned, "mad, threshold fitted on the calibration half", score_mad),
            evaluate(learned, "pair-null (library), its leave-one-out threshold", lambda m: score_null(null, m),
                     own_threshold=1.0),
            evaluate(learned, "pair-null, threshold fitted on the calibration half", lambda m: score_null(null, m))]
    for kind in sorted({m["attack"] for m in learned if m["seed"] != 0 and m["attack"] != "none"}):
        sub = [m for m in learned if m["attack"] in ("none", kind)]
        r = evaluate(sub, f"  pair-null on {kind}", lambda m: score_null(null, m), own_threshold=1.0)
        rows.append(r)
    for arch in sorted({m["model"] for m in learned}):
        sub = [m for m in learned if m["model"] == arch]
        if any(m["seed"] != 0 and m["attack"] == "none" for m in sub) and any(m["seed"] != 0 and m["attack"] != "none" for m in sub):
            rows.append(evaluate(sub, f"  pair-null on {arch}", lambda m: score_null(null, m), own_threshold=1.0))
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
