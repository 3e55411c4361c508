"""How far the input-aware attack's mnist5k ASR spreads with overrides, seeds and the CPU's rounding.

Trains the victim of ``configs/attacks/input-aware_mnist5k.yaml`` (the test's setting, as
``tests/test_attack_zoo_mnist.py`` does) once per override set and prints CA / ASR beside a clean
model's CA. Run it natively and as an AVX2-only CPU to compare (docs/attack-zoo.md):

    python benchmarks/bench_input_aware_spread.py "" "seed=1" "attack.rate=0.3;train.epochs=15"
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/bench_input_aware_spread.py ""

Each argument is one run: ``;``-separated ``key=value`` overrides of the config ("" for none).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from backdoorlab.config import load_config
from backdoorlab.data import DATASETS, make_splits
from backdoorlab.experiment import prepare
from backdoorlab.models import ModelSpec, build_model
from backdoorlab.train import TrainConfig, evaluate, train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "attacks" / "input-aware_mnist5k.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="';'-separated overrides per run ('' for none)")
    args = ap.parse_args()
    raw = DATASETS.build("mnist5k", {}, where="data")
    splits = make_splits(raw.train, raw.test, seed=0)
    torch.manual_seed(0)
    clean = build_model(ModelSpec("cnn", 10, splits.train.shape))
    train(clean, splits.train, TrainConfig(epochs=8), seed=0)
    print(f"clean model (seed-0 split, 8 epochs): CA {evaluate(clean, splits.test):.4f}")
    for spec in args.runs:
        cfg = load_config(CONFIG, [o for o in spec.split(";") if o])
        a, prep = cfg.attack, prepare(cfg)
        torch.manual_seed(0)
        model = build_model(ModelSpec("cnn", 10, prep.splits.train.shape))
        t0 = time.perf_counter()
        ia = prep.attack.train_victim(model, prep.splits.train, cfg.train, rate=a.rate, target=a.target,
                                      source=a.source, mode=a.mode, seed=cfg.seed)
        test = prep.splits.test
        asr = evaluate(ia.model, ia.triggered_test(test, target=a.target))
        print(f"{spec or '(none)'}: CA {evaluate(ia.model, test):.4f}  ASR {asr:.4f}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
