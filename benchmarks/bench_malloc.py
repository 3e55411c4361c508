"""The allocator tuning (src/backdoorlab/runtime.py) on and off, in alternating fresh processes.

It is a process-wide setting that cannot be undone inside one process, so each measurement is a
child process: ``BACKDOORLAB_TUNE_MALLOC=0`` (glibc's defaults) or ``1`` (thresholds fixed), run in
turn ``--rounds`` times. Each child loads seed 000's victim (configs/seed000_mnist.yaml on full
MNIST, cached in the store under $BACKDOORLAB_HOME; trained on first use), then times one pairwise
scan (90 pairs x ``--images-per-class`` test images) and one training epoch of the small CNN on
``--train-images`` MNIST training images. Prints every run, the medians and the ratio.

    python benchmarks/bench_malloc.py [--rounds 3] [--images-per-class 100] [--train-images 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(ipc: int, train_images: int) -> None:
    from _common import ROOT, need_shared

    import torch

    from backdoorlab.config import load_config
    from backdoorlab.defenses import DEFENSES
    from backdoorlab.experiment import prepare, train_victim
    from backdoorlab.models import ModelSpec, build_model
    from backdoorlab.store import Store
    from backdoorlab.train import TrainConfig, train

    shared = need_shared()
    cfg = load_config(ROOT / "configs" / "seed000_mnist.yaml", [f"data.root={shared}"])
    prep = prepare(cfg)
    model, _, _ = train_victim(cfg, prep, Store())
    t0 = time.perf_counter()
    DEFENSES.create("pairwise", images_per_class=ipc).inspect(model, prep.splits.test)
    scan = time.perf_counter() - t0
    tr = prep.train_set.subset(torch.arange(min(train_images, len(prep.train_set))))
    torch.manual_seed(0)
    fresh = build_model(ModelSpec("cnn", tr.num_classes, tr.shape))
    t0 = time.perf_counter()
    train(fresh, tr, TrainConfig(epochs=1, batch_size=128, lr=0.05), seed=0)
    epoch = time.perf_counter() - t0
    print(json.dumps({"scan": scan, "epoch": epoch}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images-per-class", type=int, default=100)
    ap.add_argument("--train-images", type=int, default=20000)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.images_per_class, args.train_images)
        return
    from _common import header

    header("bench_malloc: glibc malloc thresholds fixed (1) vs defaults (0), fresh process each")
    res: dict[str, list[dict]] = {"0": [], "1": []}
    for r in range(args.rounds):
        for flag in ("0", "1"):
            env = {**os.environ, "BACKDOORLAB_TUNE_MALLOC": flag}
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                                  "--images-per-class", str(args.images_per_class), "--train-images", str(args.train_images)],
                                 env=env, capture_output=True, text=True, cwd=Path(__file__).parent)
            if out.returncode:
                sys.exit(f"child failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            res[flag].append(row)
            print(f"round {r} tune={flag}: scan {row['scan']:.1f} s, one epoch on {args.train_images} images {row['epoch']:.1f} s", flush=True)
    for key, what in (("scan", f"pairwise scan, 90 pairs x {args.images_per_class} images"), ("epoch", "one training epoch")):
        off = statistics.median(r[key] for r in res["0"])
        on = statistics.median(r[key] for r in res["1"])
        print(f"{what}: median {off:.1f} s (defaults) vs {on:.1f} s (tuned) = {off / on:.2f}x")


if __name__ == "__main__":
    main()
