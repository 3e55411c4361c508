"""Foundation bars: the default run, seed 000's full-MNIST setting, one-epoch time on 60k.

    python benchmarks/bench_foundation.py
"""

from __future__ import annotations

import tempfile
import time

from _common import ROOT, header, need_shared

from backdoorlab.config import load_config
from backdoorlab.experiment import run
from backdoorlab.store import Store


def main() -> None:
    need_shared()
    header("bench_foundation")
    with tempfile.TemporaryDirectory() as tmp:
        st = Store(tmp)
        for cfg_path, bars in ((None, "CA >= 0.95, ASR >= 0.95, <= 60 s"),
                               (ROOT / "configs" / "seed000_mnist.yaml", "CA >= 0.985, ASR >= 0.97, epoch <= 15 s")):
            cfg = load_config(cfg_path, ["data.path=" + str(ROOT.parent / "shared" / "data" / "mnist" / "mnist.npz")]
                              if cfg_path else [])
            t0 = time.perf_counter()
            rec = run(cfg, st)
            wall = time.perf_counter() - t0
            m = rec.metrics
            import json
            from pathlib import Path

            hist = json.loads((Path(rec.run_dir) / "history.json").read_text())
            ep = [e["seconds"] for e in hist.get("epochs", [])]
            print(f"-- {cfg.name}: train {int(m['train_size'])} test {int(m['test_size'])}, {cfg.train.epochs} epochs, seed {cfg.seed}")
            print(f"   CA {m['clean_accuracy']:.4f}  ASR {m['attack_success_rate']:.4f}  poisoned {int(m['poison_count'])}  "
                  f"wall {wall:.1f} s  epoch seconds {', '.join(f'{s:.1f}' for s in ep)}   (bars: {bars})")


if __name__ == "__main__":
    main()
