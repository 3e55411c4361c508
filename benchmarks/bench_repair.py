"""Fine-pruning bars: the CA/ASR curve against the pruned fraction, pruning alone vs fine-pruning.

Victims (``_victims.py``; BadNets 3x3 white patch bottom-right, all-to-one -> 0, 10% poisoned):
- ``--data mnist``: full MNIST from ``shared/data`` (57,000 train, 3,000 clean held-out, 10,000
  test), the small CNN, 5 epochs. Bar: fine-pruning brings ASR <= 1% with a CA drop <= 2 points.
- ``--data cifar10``: the 10,000-image CIFAR-10 subset (9,000 train, 1,000 held-out, 10,000
  test), vgg-small, 30 epochs with crop + flip. Reported: the curve and the point reached.

``--trigger pruning-aware``: the same patch hidden by the pruning-aware attack (train clean, prune
half the last-conv channels, retrain poisoned, de-prune).

Defenses, all given only the clean held-out set (the test sets only score them):
pruning alone (one-shot, tolerance 2 points of held-out accuracy), fine-tuning alone,
fine-pruning ``once`` (the paper) and ``iterative`` (seed 001's loop, the default), all on the
channels of the last conv layer; and ``pruning-neurons`` / ``fine-pruning-neurons`` (``once``), which
prune the inputs of the first Linear layer instead: on the small CNN every (channel, position)
neuron of the last conv block.

    python benchmarks/bench_repair.py [--data mnist|cifar10] [--trigger patch|pruning-aware] [--figures DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from _common import header, need_shared
from _victims import victim

from backdoorlab.defenses import DEFENSES


def first_linear(model: torch.nn.Module) -> str:
    """The first Linear layer: on the small CNN ``fc1``, which reads every (channel, position)
    neuron of the last conv block; its inputs are what the ``*-neurons`` methods prune."""
    return next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="mnist", choices=["mnist", "cifar10", "mnist5k"])
    ap.add_argument("--trigger", default="patch", choices=["patch", "pruning-aware"])
    ap.add_argument("--figures", type=Path, default=None)
    ap.add_argument("--methods", default="pruning,fine-tuning,fine-pruning-once,fine-pruning,pruning-neurons,fine-pruning-neurons")
    ap.add_argument("--param", action="append", default=[], help="fine-pruning parameter NAME=VALUE (repeatable)")
    ap.add_argument("--tune", action="append", default=[],
                    help="fine-tuning parameter NAME=VALUE for every method that fine-tunes (repeatable; e.g. lr=0.05)")
    args = ap.parse_args()
    if args.data != "mnist5k":
        need_shared()
    header(f"bench_repair {args.data} {args.trigger}")
    if args.data == "cifar10":
        v = victim("cifar10", args.trigger, model="vgg-small", epochs=30, crop_padding=4, flip=True, holdout_fraction=0.1)
        tune = {"crop_padding": 4, "flip": True}
    else:
        v = victim(args.data, args.trigger)
        tune = {}
    print(f"-- victim: {v.describe()}")
    extra = {}
    for item in args.param:
        k, _, val = item.partition("=")
        extra[k] = yaml.safe_load(val)
    for item in args.tune:
        k, _, val = item.partition("=")
        tune[k] = yaml.safe_load(val)
    neurons = {"layer": first_linear(v.model)}
    methods = {
        "pruning": ("pruning", {}),
        "fine-tuning": ("fine-tuning", dict(tune)),
        "fine-pruning-once": ("fine-pruning", {"schedule": "once", **tune}),
        "fine-pruning": ("fine-pruning", {**tune, **extra}),
        "pruning-neurons": ("pruning", dict(neurons)),
        "fine-pruning-neurons": ("fine-pruning", {"schedule": "once", **neurons, **tune}),
    }
    from backdoorlab.evaluation import make_evaluator

    kw = dict(evaluate=make_evaluator(v.splits.test, v.triggered))
    results = {}
    print(f"   {'method':20s} {'pruned':>7s} {'CA':>7s} {'ASR':>7s} {'dCA':>7s} {'held-out':>8s} {'seconds':>7s}")
    for name in args.methods.split(","):
        method, params = methods[name]
        t0 = time.perf_counter()
        res = DEFENSES.create(method, **params).repair(v.model, v.splits.holdout, **kw)
        secs = time.perf_counter() - t0
        d = res.details
        results[name] = res
        ca0, asr0 = d["clean_accuracy_before"], d["attack_success_rate_before"]
        print(f"   {name:20s} {d['pruned_fraction']:7.3f} {d['clean_accuracy']:7.4f} {d['attack_success_rate']:7.4f} "
              f"{ca0 - d['clean_accuracy']:+7.4f} {d.get('holdout_accuracy', float('nan')):8.4f} {secs:7.1f}"
              f"   (before: CA {ca0:.4f}, ASR {asr0:.4f}; params {params or 'defaults'})", flush=True)
    for name, res in results.items():
        if not name.startswith("fine-pruning"):
            continue
        alone = {r["fraction"]: r for r in res.curve if r["finetuned"] == 0.0}
        tuned = {r["fraction"]: r for r in res.curve if r["finetuned"] == 1.0}
        print(f"-- {name} curve (pruning alone | after fine-tuning): pruned fraction, CA, ASR")
        for f in sorted(alone):
            a = alone[f]
            t = tuned.get(f)
            val = f" val {t['validation_accuracy']:.4f}" if t and "validation_accuracy" in t else ""
            right = f"| CA {t['clean_accuracy']:.4f} ASR {t['attack_success_rate']:.4f}{val}" if t else "|"
            print(f"   {a['pruned_fraction']:.3f}  CA {a['clean_accuracy']:.4f} ASR {a['attack_success_rate']:.4f} "
                  f"held-out {a['holdout_accuracy']:.4f} {right}")
    for name, res in results.items():
        d = res.details
        ok = d["attack_success_rate"] <= 0.01 and d["clean_accuracy_before"] - d["clean_accuracy"] <= 0.02
        print(f"-- {name} reached: pruned {d['pruned_fraction']:.3f}, CA {d['clean_accuracy']:.4f} "
              f"(drop {d['clean_accuracy_before'] - d['clean_accuracy']:.4f}), ASR {d['attack_success_rate']:.4f}; "
              f"bar ASR <= 1% with CA drop <= 2 points: {'met' if ok else 'NOT met'}")
    if args.figures is not None:
        from backdoorlab.plots_defenses import pruning_curve

        args.figures.mkdir(parents=True, exist_ok=True)
        for name, res in results.items():
            if name.startswith("fine-pruning"):
                png = pruning_curve(res.curve, chosen=res.details["pruned_fraction"], title=f"{name} on {v.name}")
                (args.figures / f"repair_{args.data}_{args.trigger}_{name}.png").write_bytes(png)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
