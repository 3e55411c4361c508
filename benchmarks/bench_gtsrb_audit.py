"""The pairwise audit at 43 classes (issue 22): a small GTSRB population, calibrated verdicts, time.

Trains (``backdoorlab run``, cached in ``--dir``) 12 clean ``cnn`` models (seeds 1-12) and 5
backdoored ones on the GTSRB stride-10 subset (3,724 images, 12 epochs): BadNets 3x3 -> 0, a 5x5
ball -> 12 at the top left, a 3x3 patch -> 7 at the top left, a noise blend (alpha 0.15) -> 25, and a
source-specific 3x3 patch 14 -> 1 (30% of class 14). Scans each with the pairwise inspector
(``--set KEY=VALUE`` changes its settings; 30 clean images per class, 28 in the smallest class),
fits the pair null on the calibration half's clean models (seeds 1-4 and 9-12, or 1-4 with
``--calibration 4``) and reports, for the evaluation half (clean seeds 5-8 and the 5 backdoored
models), each model's score (in units of its threshold: > 1 is flagged), flagged targets and scan
time. Usage::

    BACKDOORLAB_DATA=../shared/data python benchmarks/bench_gtsrb_audit.py --dir DIR [--set budget=null]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ATTACKS = {
    "badnets0": ["attack.name=badnets", "seed=5"],
    "ball_a2o": ["attack.name=badnets", "attack.shape=ball", "attack.size=5", "attack.position=top-left",
                 "attack.target=12", "seed=5"],
    "ss_14to1": ["attack.name=badnets", "attack.mode=source-specific", "attack.source=14", "attack.target=1",
                 "attack.rate=0.3", "seed=6"],
    "blend_a2o": ["attack.name=blend", "attack.key=noise", "attack.alpha=0.15", "attack.target=25", "seed=7"],
    "patch_tl": ["attack.name=badnets", "attack.position=top-left", "attack.target=7", "seed=8"],
}
TRUTH = {"badnets0": 0, "ball_a2o": 12, "ss_14to1": 1, "blend_a2o": 25, "patch_tl": 7}


def train(d: Path) -> dict[str, dict]:
    runs = {f"clean{s}": ["attack=null", f"seed={s}"] for s in range(1, 13)} | ATTACKS
    out = {}
    for name, sets in runs.items():
        f = d / f"{name}.json"
        if not f.is_file():
            cmd = ["backdoorlab", "run", "--set", "data.name=gtsrb", *sum([["--set", s] for s in sets], []),
                   "--store", str(d / "store"), "--json"]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            f.write_text(r.stdout)
        out[name] = json.loads(f.read_text())
        print(f"{name}: CA {out[name]['clean_accuracy']:.3f} ASR {out[name]['attack_success_rate']}", flush=True)
    return out


def main() -> None:
    from backdoorlab.api._common import model_and_data
    from backdoorlab.defenses._pair_null import fit
    from backdoorlab.defenses.pairwise import PairwiseTriggerInspector

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="models and scans are cached here")
    ap.add_argument("--set", action="append", default=[], help="a pairwise parameter, e.g. budget=null")
    ap.add_argument("--calibration", type=int, choices=(4, 8), default=8, help="clean calibration models")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    params = {k: json.loads(v) if v[:1] in "0123456789-n" else v for k, v in (p.split("=", 1) for p in args.set)}
    runs = train(args.dir)
    insp = PairwiseTriggerInspector(images_per_class=30, **params)
    tag = "".join(f"-{k}={v}" for k, v in sorted(params.items())) or "-default"
    scans = {}
    for name, r in runs.items():
        f = args.dir / f"scan{tag}-{name}.pt"
        if not f.is_file():
            net, clean = model_and_data(Path(r["run_dir"]) / "weights.safetensors", "gtsrb", split="auto", arch=None)
            t0 = time.perf_counter()
            est = insp.estimate(net, clean)
            torch.save({"norms": est["norms"], "reached": est["reached"], "seconds": time.perf_counter() - t0}, f)
        scans[name] = torch.load(f)
    cal = [f"clean{s}" for s in ([1, 2, 3, 4] if args.calibration == 4 else [1, 2, 3, 4, 9, 10, 11, 12])]
    null = fit([scans[c]["norms"] for c in cal], [scans[c]["reached"] for c in cal], (3, 32, 32))
    print(f"settings {params or 'default'}; calibration {', '.join(cal)}: {null.describe()}")
    print("model | scan s | pairs | score | flagged targets | true target | largest target z")
    for name in [*ATTACKS, "clean5", "clean6", "clean7", "clean8"]:
        s = scans[name]
        pz, cz = null.zscores(s["norms"], s["reached"])
        flagged = sorted({t for _, t in torch.nonzero(torch.nan_to_num(pz, nan=-1.0) > null.threshold).tolist()}
                         | set(torch.nonzero(cz > null.target_threshold).flatten().tolist()))
        top = int(cz.argmax())
        print(f"{name} | {s['seconds']:.1f} | {int(torch.isfinite(s['norms']).sum())} | "
              f"{null.score(s['norms'], s['reached']):.2f} | {flagged} | {TRUTH.get(name, '-')} | {top} ({float(cz[top]):.2f})")


if __name__ == "__main__":
    sys.exit(main())
