"""Seed 000 end to end on full MNIST: our batched pairwise scan vs the seed's loop, then cleansing.

Victim: configs/seed000_mnist.yaml (7 -> 1, 2x2 white patch bottom-right, 8% of class 7 poisoned,
small CNN, 4 epochs, seed 0), cached in the store under $BACKDOORLAB_HOME (default
./backdoorlab-runs). Clean images for the scan: the MNIST test set (a defender's clean set).

1. The seed's algorithm as the report writes it (Patch module, one image at a time, SGD lr 0.1,
   at most 15 epochs per pair, indicator after each step), over the same images, and our scan
   (``pairwise``, min-norm statistic, all pairs in one batch): both times, the ratio, the pair
   each ranks first.
2. Cleansing the poisoned training set with the flagged pair's pattern: techniques 1 and 2, TPR,
   FPR, AUROC, label-correction accuracy (seed: 98.92/0.02, 99.7/0, 100%).
3. ``--clean-models N``: clean victims trained with other seeds must give no alarm.

    python benchmarks/bench_inspect.py [--images-per-class 50] [--seed-loop-pairs 90] [--clean-models 2] [--full-scan-images 100]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from _common import ROOT, header, need_shared

from backdoorlab import metrics as M
from backdoorlab.config import load_config
from backdoorlab.defenses import DEFENSES
from backdoorlab.defenses.common import images_per_class
from backdoorlab.experiment import prepare, train_victim
from backdoorlab.store import Store


class Patch(nn.Module):  # the seed's code, on the CPU
    def __init__(self, shape):
        super().__init__()
        self.patch = nn.Parameter(torch.zeros(1, *shape))

    def forward(self, x):
        return torch.clip(x + self.patch, 0, 1)


def seed_loop(model, images_by_class, pi=0.9, lr=0.1, max_epochs=15, pairs=None):
    """Seed 000's perturbation_optimization for every pair, one image at a time. Returns {(s,t): l2}."""
    k = images_by_class.shape[0]
    out = {}
    for p in model.parameters():
        p.requires_grad_(False)

    def indicator(images, patch, t):
        count = 0
        for image in images:
            count += int(torch.argmax(model(patch(image[None]))) == t)
        return count / len(images)

    def objective(images, patch, t):
        loss = 0
        for image in images:
            loss = loss + F.softmax(model(patch(image[None])), 1)[0, t]
        return -loss / len(images)

    for s in range(k):
        for t in range(k):
            if s == t or (pairs is not None and (s, t) not in pairs):
                continue
            images = images_by_class[s]
            patch = Patch(images[0].shape)
            opt = torch.optim.SGD(patch.parameters(), lr=lr)
            ind, epoch = indicator(images, patch, t), 0
            while ind < pi:
                loss = objective(images, patch, t)
                opt.zero_grad()
                loss.backward()
                opt.step()
                ind = indicator(images, patch, t)
                epoch += 1
                if epoch == max_epochs:
                    break
            out[(s, t)] = float(patch.patch.detach().norm())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images-per-class", type=int, default=50)
    ap.add_argument("--seed-loop-pairs", type=int, default=90, help="run the seed's loop on this many pairs (time scales)")
    ap.add_argument("--clean-models", type=int, default=0)
    ap.add_argument("--full-scan-images", type=int, default=100, help="also time a scan with this many images per class (0: skip)")
    ap.add_argument("--all-to-one", action="store_true", help="only: audit + cleanse the full-MNIST all-to-one BadNets victim")
    args = ap.parse_args()
    shared = need_shared()
    if args.all_to_one:
        return all_to_one(args.images_per_class)
    header("bench_inspect: seed 000 on full MNIST")
    st = Store()
    cfg = load_config(ROOT / "configs" / "seed000_mnist.yaml", [f"data.root={shared}"])
    prep = prepare(cfg)
    model, _, cached = train_victim(cfg, prep, st)
    model.eval()
    clean = prep.splits.test
    print(f"victim: CA {M.accuracy(__import__('backdoorlab.train', fromlist=['predict']).predict(model, clean), clean.y):.4f} "
          f"(cached: {cached}); clean images: MNIST test set, {args.images_per_class} per class")

    insp = DEFENSES.create("pairwise", images_per_class=args.images_per_class)
    t0 = time.perf_counter()
    res = insp.inspect(model, clean)
    ours = time.perf_counter() - t0
    top = res.details["ranking"][0]
    print(f"ours (min-norm, batched): {ours:.1f} s; first pair ({top[0]},{top[1]}) anomaly {top[3]:.2f}; "
          f"flagged pairs {res.flagged_pairs}, targets {res.flagged_targets}; backdoored={res.backdoored}")
    rank71 = [(s, t) for s, t, _, _ in res.details["ranking"]].index((7, 1)) + 1 if (7, 1) in [(s, t) for s, t, _, _ in res.details["ranking"]] else ">10"
    print(f"   (7,1): l1 {float(res.scores[7, 1]):.2f}, anomaly {float(res.anomaly[7, 1]):.2f}, rank {rank71}")

    if args.full_scan_images:
        t0 = time.perf_counter()
        r100 = DEFENSES.create("pairwise", images_per_class=args.full_scan_images).inspect(model, clean)
        top = r100.details["ranking"][0]
        print(f"full scan, {args.full_scan_images} images per class: {time.perf_counter() - t0:.1f} s (issue's bar 20 s); "
              f"first pair ({top[0]},{top[1]}) anomaly {top[3]:.2f}; flagged {r100.flagged_pairs}")

    xs = images_per_class(clean, args.images_per_class, torch.Generator().manual_seed(insp.seed))
    pairs = [(s, t) for s in range(10) for t in range(10) if s != t][: args.seed_loop_pairs]
    t0 = time.perf_counter()
    norms = seed_loop(model, xs, pairs=set(pairs))
    seedt = time.perf_counter() - t0
    best = max(norms, key=norms.get)
    scale = 90 / len(pairs)
    print(f"seed loop (one image at a time, SGD 0.1, <=15 epochs): {seedt:.1f} s for {len(pairs)} pairs "
          f"({seedt * scale:.1f} s for 90 estimated); largest-norm pair {best} (l2 {norms[best]:.3f}); "
          f"(7,1) l2 {norms.get((7, 1), float('nan')):.3f}")
    print(f"speed-up ours vs seed loop (90 pairs): {seedt * scale / ours:.1f}x")

    train = prep.train_set
    for tech in (1, 2):
        c = DEFENSES.create("pattern-subtraction", technique=tech).cleanse(model, train.without_ground_truth(), inspection=res)
        f = c.flagged
        lab = M.accuracy(c.corrected_labels[train.is_poison], train.y_source[train.is_poison])
        # the seed's rule (the prediction on [x - v]) over the same samples, for comparison
        lab_seed = M.accuracy(c.details["removed_prediction"][train.is_poison], train.y_source[train.is_poison]) \
            if "removed_prediction" in c.details else float("nan")
        print(f"technique {tech}: TPR {100 * M.tpr(f, train.is_poison):.2f}%  FPR {100 * M.fpr(f, train.is_poison):.4f}%  "
              f"AUROC {M.auroc(c.scores, train.is_poison):.5f}  threshold {c.threshold:.3f}  "
              f"label correction {100 * lab:.2f}% (relabel {c.details.get('relabel')}; the seed's rule {100 * lab_seed:.2f}%)  "
              f"shift {c.details.get('shifts')}")
    print("seed 000 reports: technique 1 TPR 98.92% FPR 0.02%; technique 2 TPR 99.7% FPR 0%; labels 100%")

    for i in range(args.clean_models):
        ccfg = load_config(ROOT / "configs" / "seed000_mnist.yaml",
                           [f"data.root={shared}", "attack=null", f"seed={100 + i}"])
        cprep = prepare(ccfg)
        cm, _, _ = train_victim(ccfg, cprep, st)
        r = DEFENSES.create("pairwise", images_per_class=args.images_per_class).inspect(cm.eval(), cprep.splits.test)
        print(f"clean model seed {100 + i}: backdoored={r.backdoored} flagged {r.flagged_pairs} targets {r.flagged_targets} "
              f"max anomaly {r.max_anomaly:.2f}")


def all_to_one(images: int) -> None:
    """Full MNIST, BadNets 3x3 white square bottom-right, 10% of the non-target images -> 0 (the
    victim of bench_strip / bench_repair, cached): the per-target rule flags 0 and the cleanser uses
    that column's smallest pattern (no single pair need pass the pair threshold)."""
    import _victims as V

    header("bench_inspect --all-to-one: full MNIST all-to-one BadNets")
    v = V.victim("mnist", "patch")
    print(v.describe())
    poisoned = V.poison(v.splits.train, v.attack, rate=0.1, target=0, source=None, mode="all-to-one",
                        generator=torch.Generator().manual_seed(1))  # as V.victim poisons it (seed + 1)
    for seed in (0, 1):
        t0 = time.perf_counter()
        r = DEFENSES.create("pairwise", images_per_class=images, seed=seed).inspect(v.model, v.splits.holdout)
        print(f"inspector seed {seed}: {time.perf_counter() - t0:.1f} s; flagged pairs {r.flagged_pairs}, targets "
              f"{r.flagged_targets}; target 0 index {float(r.details['target_anomaly'][0]):.2f}")
        for tech in (1, 2):
            c = DEFENSES.create("pattern-subtraction", technique=tech).cleanse(v.model, poisoned.without_ground_truth(), inspection=r)
            lab = M.accuracy(c.corrected_labels[poisoned.is_poison], poisoned.y_source[poisoned.is_poison])
            print(f"  technique {tech}: pairs used {c.details['pairs']}; TPR {100 * M.tpr(c.flagged, poisoned.is_poison):.2f}%  "
                  f"FPR {100 * M.fpr(c.flagged, poisoned.is_poison):.4f}%  labels {100 * lab:.2f}% ({int(poisoned.is_poison.sum())} poisoned)")


if __name__ == "__main__":
    main()
