"""Pairwise-audit statistics over a model population (issue 22): which per-model score separates
backdoored from clean models on models the threshold was not fitted on.

Reads a population already run by ``backdoorlab population configs/populations/mnist.yaml`` (the
victims' weights and configs from the store), runs the pairwise scan (50 clean held-out images per
class, the cells' setting) once per model (cached in ``--cache``), and compares scores:

- ``mad``: the inspector's own score today, the largest MAD anomaly index of the log-norm residuals
  (log norm minus its row and column medians) within the model;
- ``pair-null``: each pair's residual standardised by the clean models of the calibration half
  (mean and standard deviation of that pair's residual there, the SD floored at the median SD):
  natural look-alike pairs, small in every clean model, no longer stand out;
- ``target-null``: the same for the per-target column medians (all-to-one attacks shrink a column).

Calibration half: seed 0's models; evaluation half: seed 1's. Every threshold is fitted on the
calibration half only (the smallest score above every clean calibration model) and reported on the
evaluation half. Usage::

    BACKDOORLAB_DATA=../shared/data BACKDOORLAB_HOME=STORE python benchmarks/bench_population.py [--grid population-mnist]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def scan_population(grid: str, cache: Path) -> list[dict]:
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
        f = cache / f"{r.cell_id[:16]}.pt"
        if not f.is_file():
            cfg = ExperimentConfig.model_validate(rec.config)
            prep = prepare(cfg)
            model = load_model(Path(rec.run_dir) / "weights.safetensors", num_classes=prep.train_set.num_classes,
                               input_shape=prep.train_set.shape)
            t0 = time.perf_counter()
            est = PairwiseTriggerInspector(images_per_class=50).estimate(model, prep.splits.holdout)
            torch.save({"norms": est["norms"], "reached": est["reached"]}, f)
            print(f"[{i + 1}/{len(rows)}] {r.data}/{r.model}/{r.attack}/seed{r.seed}: {time.perf_counter() - t0:.1f} s",
                  flush=True)
        d = torch.load(f)
        a = rec.config.get("attack") or {}
        out.append({"data": r.data, "model": r.model, "attack": r.attack, "seed": r.seed, "norms": d["norms"],
                    "reached": d["reached"], "target": a.get("target"), "source": a.get("source"),
                    "mode": a.get("mode"), "asr": rec.metrics.get("attack_success_rate")})
    return out


def residuals(norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair residuals (K, K), column medians (K,)) of the log norms, as the inspector computes them."""
    logn = norms.clamp_min(1e-6).log()
    rowmed = logn.nanmedian(1, keepdim=True).values
    colmed = logn.nanmedian(0, keepdim=True).values
    return logn - rowmed - colmed, colmed.flatten()


def score_mad(m: dict) -> tuple[float, int]:
    from backdoorlab.defenses.base import mad_anomaly_index

    res, _ = residuals(m["norms"])
    a = -mad_anomaly_index(res.flatten()).view_as(res)
    a[~m["reached"]] = float("nan")
    i = int(torch.nan_to_num(a, nan=-1e9).flatten().argmax())
    return float(torch.nan_to_num(a, nan=-1e9).flatten()[i]), i % res.shape[1]


def null_stats(models: list[dict]) -> dict:
    res = torch.stack([residuals(m["norms"])[0] for m in models])
    col = torch.stack([residuals(m["norms"])[1] for m in models])

    def ms(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, sd = x.nanmean(0), (x - x.nanmean(0)).pow(2).nanmean(0).sqrt()
        floor = sd[torch.isfinite(sd)].median()
        return mu, sd.clamp_min(float(floor))

    return {"pair": ms(res), "col": ms(col)}


def score_null(m: dict, null: dict, which: str) -> tuple[float, int]:
    res, col = residuals(m["norms"])
    if which == "pair":
        mu, sd = null["pair"]
        z = (mu - res) / sd
        z[~m["reached"]] = float("nan")
        z = torch.nan_to_num(z, nan=-1e9)
        i = int(z.flatten().argmax())
        return float(z.flatten()[i]), i % res.shape[1]
    mu, sd = null["col"]
    z = (mu - col) / sd
    i = int(z.argmax())
    return float(z[i]), i


def evaluate(models: list[dict], name: str, fn) -> dict:
    from backdoorlab import metrics as M
    from backdoorlab.population import tpr_at_fpr

    cal = [m for m in models if m["seed"] == 0]
    ev = [m for m in models if m["seed"] != 0]
    sc_cal = [fn(m) for m in cal]
    thr = math.nextafter(max(s for (s, _), m in zip(sc_cal, cal) if m["attack"] == "none"), math.inf)
    sc = [fn(m) for m in ev]
    s = torch.tensor([x for x, _ in sc], dtype=torch.float64)
    t = torch.tensor([m["attack"] != "none" for m in ev])
    flagged = s >= thr
    named = torch.tensor([m["attack"] != "none" and tgt == m["target"] for (_, tgt), m in zip(sc, ev)])
    return {"statistic": name, "auroc": M.auroc(s, t), "tpr@5%fpr": tpr_at_fpr(s, t, 0.05), "threshold": thr,
            "false_alarms": f"{int((flagged & ~t).sum())}/{int((~t).sum())}", "tpr": float(flagged[t].float().mean()),
            "found": float((flagged & named)[t].float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="population-mnist")
    ap.add_argument("--cache", type=Path, default=Path("population-scans"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from backdoorlab.runtime import tune_allocator

    tune_allocator()
    models = scan_population(args.grid, args.cache)
    learned = [m for m in models if m["attack"] == "none" or (m["asr"] or 0) >= 0.5]  # attacks that took
    print(f"{len(models)} models ({sum(m['attack'] == 'none' for m in models)} clean); "
          f"{len(models) - len(learned)} backdoored ones with ASR < 0.5 left out")
    null = null_stats([m for m in learned if m["seed"] == 0 and m["attack"] == "none"])
    rows = [evaluate(learned, "mad (today)", score_mad),
            evaluate(learned, "pair-null", lambda m: score_null(m, null, "pair")),
            evaluate(learned, "target-null", lambda m: score_null(m, null, "col")),
            evaluate(learned, "max(pair-null, target-null)",
                     lambda m: max(score_null(m, null, "pair"), score_null(m, null, "col")))]
    cols = list(rows[0])
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
