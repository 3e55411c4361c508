"""The library's calibrated Neural Cleanse verdict with clean models of the suspect's architecture, or of
another (issue 22, docs/populations.md "Nulls per architecture"), through the public API end to end.

Reads the MNIST population and its extra clean models from a store (``backdoorlab bench
configs/populations/mnist.yaml --set 'defenses=[]'`` and ``backdoorlab bench
configs/populations/mnist_clean_extra.yaml``, same ``--store``). Calibrates Neural Cleanse
(``backdoorlab.api.calibrate``, what ``backdoorlab calibrate --inspector neural-cleanse`` runs) on the
calibration seeds' clean models of ``--arch`` and, for comparison, on as many clean models of
``--other`` (same training sizes and seeds); then inspects every evaluation-seed model of ``--arch``
with each calibration (``NeuralCleanse(calibration=...)``). One clean image set serves every model:
the MNIST test split of the first evaluation model's config. Usage::

    BACKDOORLAB_DATA=../shared/data BACKDOORLAB_HOME=STORE python benchmarks/bench_calibrate_per_arch.py --arch mlp --other cnn
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="mlp", help="the suspects' architecture (a population model label)")
    ap.add_argument("--other", default="cnn", help="the other architecture to calibrate on, for comparison")
    ap.add_argument("--grids", default="population-mnist,population-mnist-clean-extra")
    ap.add_argument("--evaluation-seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("calibrate-per-arch"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from backdoorlab import api
    from backdoorlab.cellstore import CellStore
    from backdoorlab.config import ExperimentConfig
    from backdoorlab.defenses.neural_cleanse import NeuralCleanse
    from backdoorlab.experiment import prepare
    from backdoorlab.models import load_model
    from backdoorlab.store import Store, default_home

    cs = CellStore(Store(default_home()))
    rows = [r for g in args.grids.split(",") for r in cs.cells(g) if r.defense == "none" and r.status == "done"]
    recs = cs.records(rows)
    if not rows:
        raise SystemExit(f"no trained models of {args.grids} in {default_home()}: run the two `backdoorlab bench` "
                         "commands of the docstring first")

    def weights(r) -> Path:
        return Path(recs[r.cell_id].run_dir) / "weights.safetensors"

    calibration = {a: [r for r in rows if r.model == a and r.attack == "none" and r.seed != args.evaluation_seed]
                   for a in (args.arch, args.other)}
    suspects = sorted((r for r in rows if r.model == args.arch and r.seed == args.evaluation_seed),
                      key=lambda r: (r.attack == "none", r.data))
    cfg = ExperimentConfig.model_validate(recs[suspects[0].cell_id].config)
    clean = prepare(cfg).splits.test
    args.out.mkdir(parents=True, exist_ok=True)
    files = {}
    for a, models in calibration.items():
        t0 = time.perf_counter()
        rep = api.calibrate([weights(r) for r in models], clean, args.out / f"nc-{a}.safetensors",
                            inspector="neural-cleanse")
        files[a] = rep.path
        print(f"calibrated on {len(models)} clean {a} models: {rep.null.describe()} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    out = []
    for r in suspects:
        a_ = recs[r.cell_id].config.get("attack") or {}
        model = load_model(weights(r), num_classes=clean.num_classes, input_shape=clean.shape)
        row = {"data": r.data, "model": r.model, "attack": r.attack, "target": a_.get("target"),
               "asr": recs[r.cell_id].metrics.get("attack_success_rate")}
        for a, f in files.items():
            res = NeuralCleanse(calibration=str(f)).inspect(model, clean)
            row[a] = {"backdoored": res.backdoored, "score": round(float(res.max_anomaly), 3),
                      "flagged": res.flagged_targets, "threshold_source": res.threshold_source}
        out.append(row)
        print(f"  {r.data:10s} {r.attack:12s} target {row['target']!s:4s} ASR {row['asr'] or 0:.2f}  "
              + "  ".join(f"{a}-calibrated: {'backdoored' if row[a]['backdoored'] else 'clean':10s} "
                          f"{row[a]['score']:5.2f} {row[a]['flagged']}" for a in files), flush=True)
    print("threshold sources:", *{row[a]["threshold_source"] for row in out for a in files}, sep="\n  ")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
