"""Grid benchmarks (issue 8).

1. The same small grid (configs/grids/tiny_mnist5k.yaml, enlarged by --set overrides) on 1 and on 2
   local Ray workers: the metrics must be identical; prints the speed-up (wall time of the whole
   ``run_grid``, Ray start-up included, and of the cells alone).
2. The seed-000 grid (configs/grids/seed000_mnist.yaml: full MNIST, 7 -> 1, pairwise + pattern
   subtraction) end to end through the CLI in a fresh store (the victim is trained): bar <= 3 min.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python benchmarks/bench_grid.py [--skip-ray] [--skip-seed000]
        [--seed000-engine local --seed000-workers 2]

Part 2 reads full MNIST through $BACKDOORLAB_DATA (set here to the shared data folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, header, need_shared  # noqa: E402

SMALL = ["base.train.epochs=3", "base.data.train_size=3000", "base.data.test_size=600"]


def _metrics(store: Path, grid: str) -> dict[str, dict[str, float]]:
    from backdoorlab.cellstore import CellStore
    from backdoorlab.store import Store

    cs = CellStore(Store(store))
    rows = cs.cells(grid)
    recs = cs.records(rows)
    return {f"{r.attack}/{r.defense}": {k: v for k, v in recs[r.cell_id].metrics.items() if "seconds" not in k}
            for r in rows if r.status == "done"}


def ray_speedup() -> None:
    from backdoorlab.bench import run_grid
    from backdoorlab.engines import RayEngine
    from backdoorlab.grid import load_grid
    from backdoorlab.store import Store

    grid = load_grid(ROOT / "configs" / "grids" / "tiny_mnist5k.yaml", SMALL)
    print(f"-- small grid {grid.name} ({len(grid.groups)} victims, {len(grid.cells)} cells; {' '.join(SMALL)}) on local Ray")
    res, wall, cells = {}, {}, {}
    for w in (1, 2):
        with tempfile.TemporaryDirectory(prefix=f"bench-grid-ray{w}-") as d:
            t0 = time.perf_counter()
            eng = RayEngine(workers=w)
            t1 = time.perf_counter()
            try:
                s = run_grid(grid, Store(d), eng)
            finally:
                eng.close()
            wall[w] = time.perf_counter() - t0
            cells[w] = s.seconds
            assert s.failed == 0, s.failures
            res[w] = _metrics(Path(d), grid.name)
            print(f"   {w} worker(s): {wall[w]:.1f} s wall (Ray start {t1 - t0:.1f} s, grid {s.seconds:.1f} s), {s.done} cells")
    same = res[1] == res[2]
    print(f"   identical metrics on 1 and 2 workers: {same}")
    for k in sorted(res[1]):
        m = res[1][k]
        print(f"     {k:28s} " + ", ".join(f"{x} {m[x]:.4f}" for x in ("clean_accuracy", "attack_success_rate", "der", "frr", "far")
                                             if x in m))
    print(f"   speed-up 2 vs 1 workers: {wall[1] / wall[2]:.2f}x wall, {cells[1] / cells[2]:.2f}x grid (without Ray start-up)")
    if not same:
        diff = {k: (res[1][k], res[2].get(k)) for k in res[1] if res[1][k] != res[2].get(k)}
        print(f"   DIFFERENT: {json.dumps(diff, indent=1)[:2000]}")


def seed000(engine: str, workers: int) -> None:
    shared = need_shared()
    with tempfile.TemporaryDirectory(prefix="bench-grid-seed000-") as d:
        cmd = [sys.executable, "-c", "from backdoorlab.cli import main; main()", "bench",
               str(ROOT / "configs" / "grids" / "seed000_mnist.yaml"), "--store", d, "--engine", engine,
               "--workers", str(workers), "--json"]
        print(f"-- seed-000 grid on full MNIST, end to end (CLI start-up included), --engine {engine} --workers {workers}")
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=d, capture_output=True, text=True, env={**os.environ, "BACKDOORLAB_DATA": str(shared)})
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            print(p.stderr[-3000:])
            raise SystemExit(f"bench failed ({p.returncode})")
        out = json.loads(p.stdout)
        for r in out["results"]:
            m = r["metrics"]
            keys = ("clean_accuracy", "attack_success_rate", "train_size", "test_size", "pair_found", "target_found",
                    "max_anomaly", "tpr", "fpr", "label_accuracy", "flagged", "seconds", "seconds_total")
            print(f"   {r['defense']:22s} " + ", ".join(f"{k} {m[k]:.4g}" for k in keys if k in m))
        rep = subprocess.run([sys.executable, "-c", "from backdoorlab.cli import main; main()", "report", "seed000-mnist",
                              "--store", d, "--out", str(Path(d) / "report"), "--json"], cwd=ROOT, capture_output=True, text=True)
        if rep.returncode == 0:
            md = (Path(d) / "report" / "report.md").read_text()
            print("   report tables:\n" + "\n".join("     " + line for line in md.splitlines() if line.startswith("|")))
        print(f"   end to end: {wall:.1f} s (bar: <= 180 s) -> {'met' if wall <= 180 else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-seed000", action="store_true")
    ap.add_argument("--seed000-engine", default="local")
    ap.add_argument("--seed000-workers", type=int, default=2)
    a = ap.parse_args()
    header("bench_grid: grids on 1 / 2 Ray workers; seed-000 grid end to end")
    if not a.skip_ray:
        ray_speedup()
    if not a.skip_seed000:
        seed000(a.seed000_engine, a.seed000_workers)


if __name__ == "__main__":
    main()
