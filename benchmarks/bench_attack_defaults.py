"""Every attack picked by name alone (issue 23, item 1): ``run --set attack.name=X`` on a data set,
nothing else changed, so each attack takes its own declared defaults (``backdoorlab list``).
Prints CA, ASR and the CA drop against a clean model of the same seed, data and epochs.

    BACKDOORLAB_DATA=../shared/data python benchmarks/bench_attack_defaults.py [--data mnist5k]
        [--attacks badnets,blend,...] [--seed 0] [--train-size N] [--store DIR] [--json OUT]

Bar (issue 23): ASR >= 0.9 for every attack but multiplicative (reported), CA within 3 points of
the clean model. Victims are cached in the store, so a rerun only evaluates.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import header

from backdoorlab import api
from backdoorlab.attacks import ATTACKS, attack_defaults, data_kind

BAR_EXEMPT = {"multiplicative"}  # weak by nature (seed 001); reported, not held to the bar


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="mnist5k")
    ap.add_argument("--attacks", help="comma-separated (default: every registered attack)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-size", type=int, help="data.train_size (default: the data set's)")
    ap.add_argument("--store", type=Path, default=Path("backdoorlab-runs/bench-attack-defaults"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    header(f"attacks by name on {args.data}, seed {args.seed}")
    names = args.attacks.split(",") if args.attacks else ATTACKS.names()
    common = [f"data.name={args.data}", f"seed={args.seed}"]
    if args.train_size:
        common.append(f"data.train_size={args.train_size}")
    kind = data_kind(args.data)
    clean_by_epochs: dict[int, float] = {}
    rows = []
    for name in names:
        d = attack_defaults(name, kind, args.data)
        epochs = int(d.get("epochs", 10))
        if epochs not in clean_by_epochs:  # the clean model of the same data, seed and epochs
            rec = api.run(None, store=args.store, overrides=[*common, "attack=null", f"train.epochs={epochs}"])
            clean_by_epochs[epochs] = rec.metrics["clean_accuracy"]
            print(f"   clean model, {epochs} epochs: CA {clean_by_epochs[epochs]:.4f}", flush=True)
        t = time.perf_counter()
        rec = api.run(None, store=args.store, overrides=[*common, f"attack.name={name}"])
        ca, asr = rec.metrics["clean_accuracy"], rec.metrics["attack_success_rate"]
        drop = clean_by_epochs[epochs] - ca
        ok = name in BAR_EXEMPT or (asr >= 0.9 and drop <= 0.03)
        row = {"attack": name, "mode": rec.config["attack"]["mode"], "epochs": epochs, "ca": ca, "asr": asr,
               "clean_ca": clean_by_epochs[epochs], "ca_drop": drop, "bar": "exempt" if name in BAR_EXEMPT else ok,
               "seconds": time.perf_counter() - t}
        rows.append(row)
        print(f"   {name:16s} {row['mode']:15s} epochs {epochs:2d}  CA {ca:.4f} (clean {row['clean_ca']:.4f}, "
              f"drop {drop * 100:+.1f} pt)  ASR {asr:.4f}  {'ok' if ok else 'BELOW BAR'}"
              f"{' (exempt)' if name in BAR_EXEMPT else ''}  {row['seconds']:.0f} s", flush=True)
    failing = [r["attack"] for r in rows if r["bar"] is False]
    print(f"   bar (ASR >= 0.9, CA drop <= 3 pt, multiplicative exempt): {'met' if not failing else 'missed by ' + ', '.join(failing)}")
    if args.json:
        args.json.write_text(json.dumps({"data": args.data, "seed": args.seed, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
