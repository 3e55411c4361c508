"""Benchmark grids: validation, the store's schema migration and bench lock, resume after a real
SIGKILL, the Ray engine on a local Ray instance, and the report (contents, and rendering in
headless Chromium)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from backdoorlab.cli import app

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "grids" / "tiny_mnist5k.yaml"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _bench_cmd(*args) -> list[str]:
    return [sys.executable, "-c", "from backdoorlab.cli import main; main()", "bench", *map(str, args)]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _done_metrics(store: Path, grid: str) -> dict[str, dict[str, float]]:
    from backdoorlab.cellstore import CellStore
    from backdoorlab.store import Store

    cs = CellStore(Store(store))
    rows = cs.cells(grid)
    recs = cs.records(rows)
    return {r.cell_id: {k: v for k, v in recs[r.cell_id].metrics.items() if "seconds" not in k} for r in rows
            if r.status == "done"}


# ----------------------------------------------------------------------------- bad input (fast)
def test_unknown_names_listed_together_before_anything_runs(tmp_path):
    g = _write(tmp_path / "g.yaml", "name: bad\nattacks: [{name: badnets}, {name: nosuchattack}, {name: other-attack}]\n"
                                    "defenses: [{name: strip}, {name: nosuchdefense}]\nmodels: [{name: resnet9000}]\n")
    r = invoke("bench", g, "--store", tmp_path / "st")
    assert r.exit_code == 2, r.output
    msg = " ".join(r.output.split())
    for name in ("nosuchattack", "other-attack", "nosuchdefense", "resnet9000"):
        assert name in msg
    assert "known:" in msg and "Traceback" not in r.output
    assert not (tmp_path / "st").exists()  # nothing ran, nothing written


@pytest.mark.parametrize("text,match", [
    ("", "empty grid"),
    ("name: e\nattacks: []\n", "attacks is empty"),
    ("name: e\nattacks: [{name: badnets}]\nseeds: []\n", "seeds is empty"),
    ("name: e\nattacks: [{name: badnets}, {name: badnets}]\n", "distinct label"),
    ("name: e\nattacks: [{name: badnets, sizee: 3}]\n", "attack.sizee"),
    ("name: e\nattacks: [{name: badnets}]\ndefenses: [{name: strip}]\n"
     "overrides: [{match: {defense: strip}, set: {train.epochs: 1}}]\n", "change the victim"),
])
def test_bad_grids(tmp_path, text, match):
    g = _write(tmp_path / "g.yaml", text)
    r = invoke("bench", g, "--store", tmp_path / "st")
    assert r.exit_code == 2, r.output
    assert match in " ".join(r.output.split())
    assert not (tmp_path / "st").exists()


def test_grid_expansion_and_stable_ids():
    from backdoorlab.grid import load_grid

    g = load_grid(TINY)
    assert len(g.groups) == 2 and len(g.cells) == 6
    assert {c.defense for c in g.cells} == {"none", "fine-tuning", "strip"}
    assert [c.cell_id for c in load_grid(TINY).cells] == [c.cell_id for c in g.cells]
    blend = [grp for grp in g.groups if grp.victim.attack == "blend"][0]
    assert blend.victim.config.attack.rate == 0.15  # the per-cell override
    assert len({c.cell_id for c in g.cells}) == 6
    g2 = load_grid(TINY, ["base.train.epochs=1"])
    assert not {c.cell_id for c in g2.cells} & {c.cell_id for c in g.cells}


def test_a_changed_library_default_makes_new_defense_cells(monkeypatch, tmp_path):
    """A cell's id holds every parameter its defense runs with, defaults included: a library whose
    default changed does not reuse a result computed with the old one (the store's done cells no
    longer match), and a default spelled out in the YAML is the same cell as one left out."""
    from pydantic.dataclasses import dataclass as pdc

    from backdoorlab.defenses import DEFENSES
    from backdoorlab.defenses.fine_tuning import FineTuning
    from backdoorlab.grid import load_grid
    from backdoorlab.registry import Entry

    before = {(c.attack, c.defense): c.cell_id for c in load_grid(TINY).cells}
    text = TINY.read_text().replace("- {name: fine-tuning}", "- {name: fine-tuning, lr: 0.1}")
    assert "lr: 0.1}" in text
    spelled = {(c.attack, c.defense): c.cell_id for c in load_grid(_write(tmp_path / "g.yaml", text)).cells}
    assert spelled == before  # lr 0.1 is fine-tuning's default

    @pdc(frozen=True)
    class NewDefaults(FineTuning):
        lr: float = 0.02

    monkeypatch.setitem(DEFENSES._entries, "fine-tuning", Entry("fine-tuning", NewDefaults, "fine-tuning, new default"))
    after = {(c.attack, c.defense): c.cell_id for c in load_grid(TINY).cells}
    for key, cid in before.items():
        assert (after[key] != cid) == (key[1] == "fine-tuning"), key  # victims and strip cells are kept


def test_shipped_grids_validate():
    from backdoorlab.grid import load_grid

    for p in sorted((ROOT / "configs" / "grids").glob("*.yaml")):
        g = load_grid(p)
        assert g.cells, p


def test_store_not_sqlite_or_newer_schema_never_overwritten(tmp_path):
    st = tmp_path / "st"
    st.mkdir()
    (st / "backdoorlab.db").write_text("not a database")
    r = invoke("bench", TINY, "--store", st)
    assert r.exit_code == 2 and "not an SQLite database" in " ".join(r.output.split())
    assert (st / "backdoorlab.db").read_text() == "not a database"
    st2 = tmp_path / "st2"
    st2.mkdir()
    con = sqlite3.connect(st2 / "backdoorlab.db")
    con.execute("PRAGMA user_version = 7")
    con.commit()
    con.close()
    before = (st2 / "backdoorlab.db").read_bytes()
    for cmd in (("bench", TINY), ("report",)):
        r = invoke(*cmd, "--store", st2)
        assert r.exit_code == 2 and "newer" in " ".join(r.output.split()), r.output
    assert (st2 / "backdoorlab.db").read_bytes() == before


def test_schema_v1_migrates_additively(tmp_path):
    from backdoorlab.store import _SCHEMA, SCHEMA_VERSION, Store

    db = tmp_path / "backdoorlab.db"
    con = sqlite3.connect(db)
    con.executescript(_SCHEMA + "\nPRAGMA user_version = 1;")
    con.execute("INSERT INTO runs VALUES ('r1','old','experiment',1.0,'done',2.0,'{}',NULL,'x')")
    con.execute("INSERT INTO metrics VALUES ('r1','clean_accuracy',0.5)")
    con.commit()
    con.close()
    st = Store(tmp_path)
    assert st.get("r1").metrics == {"clean_accuracy": 0.5}
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "metrics", "artifacts", "grids", "cells"} <= tables
    con.close()


def test_second_bench_on_the_same_store_refuses_clearly(tmp_path):
    from backdoorlab.store import Store

    st = tmp_path / "st"
    Store(st)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom backdoorlab.cellstore import bench_lock\nfrom backdoorlab.store import Store\n"
        f"with bench_lock(Store({str(st)!r})):\n    print('locked', flush=True)\n    time.sleep(60)\n")],
        stdout=subprocess.PIPE, env=_env(), text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        r = invoke("bench", TINY, "--store", st, "--wait", "0.5")
        assert r.exit_code == 2, r.output
        msg = " ".join(r.output.split())
        assert "another `backdoorlab bench`" in msg and f"pid {holder.pid}" in msg and "--wait" in msg
        assert time.monotonic() - t0 >= 0.5
    finally:
        holder.kill()
        holder.wait()
    con = sqlite3.connect(st / "backdoorlab.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT count(*) FROM cells").fetchone()[0] == 0
    con.close()


def _commit_many(args):
    root, tag, n = args
    from backdoorlab.store import RunRecord, Store

    st = Store(root)
    for i in range(n):
        rid = f"{tag}-{i}"
        with st.new_run(rid) as d:
            (d / "m.json").write_text("{}")
            st.commit(RunRecord(rid, "c", "experiment", time.time(), "done", 0.1, {}, {"x": float(i)}), d)
    return n


def test_concurrent_writers_no_corruption(tmp_path):
    """Two processes committing runs to one store at once: SQLite's busy timeout serialises them."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(2) as pool:
        assert pool.map(_commit_many, [(str(tmp_path), "a", 25), (str(tmp_path), "b", 25)]) == [25, 25]
    con = sqlite3.connect(tmp_path / "backdoorlab.db")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT count(*) FROM runs").fetchone()[0] == 50
    assert con.execute("SELECT count(*) FROM metrics").fetchone()[0] == 50
    con.close()
    assert len([p for p in (tmp_path / "runs").iterdir()]) == 50


def test_published_lookup():
    from backdoorlab.published import lookup

    cfg = {"data": {"name": "npz", "path": "../shared/data/mnist/mnist.npz"}, "model": {"name": "cnn"},
           "attack": {"name": "badnets", "mode": "source-specific", "source": 7, "target": 1}, "defenses": []}
    p, exact = lookup(cfg, "paper")
    assert exact and p.values == {"clean_accuracy": 0.986, "attack_success_rate": 0.997}
    p, exact = lookup({**cfg, "defenses": [{"name": "pattern-subtraction", "technique": 1}]}, "paper")
    assert exact and p.values["tpr"] == 0.9892
    bb = {"data": {"name": "cifar10"}, "model": {"name": "preact-resnet18"}, "attack": {"name": "sig", "mode": "clean-label"},
          "defenses": [{"name": "abl"}]}
    p, exact = lookup(bb, "backdoorbench")
    assert exact and p.values == {"clean_accuracy": 0.578, "attack_success_rate": 0.0}
    p, exact = lookup({**bb, "model": {"name": "vgg-small"}}, "backdoorbench")
    assert p is not None and not exact
    assert lookup({**bb, "data": {"name": "gtsrb"}}, "backdoorbench")[0] is None


# ----------------------------------------------------------------------------- real runs (slow)
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The tiny grid run once, uninterrupted, in a subprocess."""
    st = tmp_path_factory.mktemp("ref")
    p = subprocess.run(_bench_cmd(TINY, "--store", st, "--json"), env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["done"] == d["cells"] == 6 and d["failed"] == 0 and d["victims_trained"] == 2
    return st


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, reference):
    st = tmp_path / "st"
    k = 2
    proc = subprocess.Popen(_bench_cmd(TINY, "--store", st), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    db = st / "backdoorlab.db"
    done = 0
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
                    done = con.execute("SELECT count(*) FROM cells WHERE status='done'").fetchone()[0]
                    con.close()
                except sqlite3.OperationalError:
                    done = 0
                if done >= k:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the bench finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    con = sqlite3.connect(db)
    n_done = con.execute("SELECT count(*) FROM cells WHERE status='done'").fetchone()[0]
    assert k <= n_done < 6
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    p = subprocess.run(_bench_cmd(TINY, "--store", st, "--json"), env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["skipped"] == n_done and d["done"] == 6 - n_done and d["failed"] == 0
    assert "already done, skipped" in p.stderr
    ours, ref = _done_metrics(st, "tiny-mnist5k"), _done_metrics(reference, "tiny-mnist5k")
    assert len(ours) == len(ref) == 6 and set(ours) == set(ref)
    for cid in ref:
        assert ours[cid].keys() == ref[cid].keys()
        for key, v in ref[cid].items():
            if key != "victim_from_cache":
                assert ours[cid][key] == pytest.approx(v, abs=1e-6), (cid, key)
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM runs WHERE kind='cell'").fetchone()[0] == 6  # nothing duplicated
    assert con.execute("SELECT count(*) FROM cells").fetchone()[0] == 6
    con.close()
    names = sorted(p.name for p in (st / "runs").iterdir())
    assert len(names) == 6 and not any(n.startswith(".tmp") for n in names)


@pytest.mark.slow
def test_report_contents(tmp_path, reference):
    out = tmp_path / "rep"
    r = invoke("report", "tiny-mnist5k", "--store", reference, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["cells"] == d["cells_done"] == 6 and d["figures"] >= 5
    doc = json.loads((out / "report.json").read_text())
    ca = doc["tables"]["ca-asr"]
    row = [x for x in ca["rows"] if x[2] == "badnets" and x[3] == "fine-tuning"][0]
    cab, asrb, caa, asra, der = (float(row[i]) for i in range(5, 10))
    assert der == pytest.approx(((max(0, asrb - asra) - max(0, cab - caa)) + 1) / 2, abs=2e-3)
    assert "detectors-input" in doc["tables"]
    import csv

    rows = list(csv.DictReader((out / "cells.csv").open()))
    assert len(rows) == 6 and {r["defense"] for r in rows} == {"none", "fine-tuning", "strip"}
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "src='figures/" not in html  # self-contained
    assert (out / "report.md").read_text().count("![") == d["figures"]
    r = invoke("report", "nosuchgrid", "--store", reference)
    assert r.exit_code == 2 and "neither a grid nor a run" in r.output


def test_report_leaves_out_cells_of_earlier_grid_versions(tmp_path, reference):
    """A store keeps the cells of every version of a grid; the report shows the grid as last run.
    Here the saved grid's strip now takes 6 samples (as after an edit of the YAML, or a changed
    default): the strip cells computed with 8 are no longer the grid's and are left out."""
    from backdoorlab.cellstore import CellStore
    from backdoorlab.store import Store

    st = tmp_path / "st"
    shutil.copytree(reference, st)
    cs = CellStore(Store(st))
    spec = cs.grid_spec("tiny-mnist5k")
    [strip] = [d for d in spec["defenses"] if d["name"] == "strip"]
    strip["samples"] = 6
    cs.save_grid("tiny-mnist5k", spec)
    assert len(cs.cells("tiny-mnist5k")) == 6  # nothing deleted
    r = invoke("report", "tiny-mnist5k", "--store", st, "--out", tmp_path / "rep", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["cells"] == 4
    import csv

    rows = list(csv.DictReader((tmp_path / "rep" / "cells.csv").open()))
    assert {r["defense"] for r in rows} == {"none", "fine-tuning"}


def _chromium() -> str | None:
    for c in ("/usr/bin/chromium", shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if c and Path(c).exists():
            return c
    return None


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="Debian's chromium is not installed (apt-get install -y chromium); CI installs it")
def test_report_renders_in_headless_chromium(tmp_path, reference):
    out = tmp_path / "rep"
    assert invoke("report", "tiny-mnist5k", "--store", reference, "--out", out).exit_code == 0
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}"]
    url = (out / "report.html").as_uri()
    shot = tmp_path / "shot.png"
    p = subprocess.run(base + [f"--screenshot={shot}", "--window-size=1280,1800", url], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000, p.stderr[-500:]
    from PIL import Image

    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert img.size == (1280, 1800) and hi - lo > 100  # not a blank page
    p = subprocess.run(base + ["--dump-dom", url], capture_output=True, timeout=120, text=True)
    dom = p.stdout
    for tid in ("ca-asr", "der-matrix", "detectors-input"):
        assert f'id="{tid}"' in dom, tid
    assert dom.count("<tr>") >= 8 and "fine-tuning" in dom and "summary-figure" in dom
    assert dom.count("data:image/png;base64,") >= 6


@pytest.mark.slow
def test_ray_engine_one_and_two_workers_identical(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'backdoorlab[ray]'")
    del ray
    g = _write(tmp_path / "g.yaml", (
        "name: ray-tiny\nbase: {train: {epochs: 1, batch_size: 64}, data: {train_size: 500, test_size: 200, holdout_fraction: 0.1}}\n"
        "attacks: [{name: badnets, rate: 0.1}, {name: blend, rate: 0.15, alpha: 0.2}]\ndefenses: [{name: fine-tuning, epochs: 1}]\n"))
    from backdoorlab.bench import run_grid
    from backdoorlab.engines import RayEngine
    from backdoorlab.grid import load_grid
    from backdoorlab.store import Store

    grid = load_grid(g)
    results = {}
    for w in (1, 2):
        st = tmp_path / f"st{w}"
        eng = RayEngine(workers=w)  # a local Ray instance with w CPUs; one torch thread per task
        try:
            s = run_grid(grid, Store(st), eng)
        finally:
            eng.close()
        assert s.engine == "ray" and s.workers == w and s.done == 4 and s.failed == 0, s.failures
        results[w] = _done_metrics(st, "ray-tiny")
    assert results[1].keys() == results[2].keys() and len(results[1]) == 4
    for cid, m in results[1].items():
        for key, v in m.items():
            assert results[2][cid][key] == pytest.approx(v, abs=1e-9), (cid, key)


def test_cleanser_chained_after_an_identical_inspection_only():
    from backdoorlab.bench import chain_defenses
    from backdoorlab.grid import load_grid

    g = load_grid(ROOT / "configs" / "grids" / "seed000_mnist.yaml")
    assert [[c.defense for c in t] for t in chain_defenses(list(g.groups[0].defenses))] == [["pairwise", "pattern-subtraction"]]
    other = load_grid(ROOT / "configs" / "grids" / "seed000_mnist.yaml",
                      ["defenses=[{name: pairwise, images_per_class: 40}, {name: pattern-subtraction, images_per_class: 50}]"])
    assert [[c.defense for c in t] for t in chain_defenses(list(other.groups[0].defenses))] == [["pairwise"], ["pattern-subtraction"]]


def test_grid_bias_maps_gets_its_reference_and_abl_runs(tmp_path):
    """Defenses that need more than the victim: bias-maps trains its clean reference inside the
    task (``reference_seed``), ABL trains a fresh model on the poisoned data."""
    grid = _write(tmp_path / "g.yaml", """
name: tiny-more
base:
  train: {epochs: 1, batch_size: 64}
  data: {train_size: 600, test_size: 200, holdout_fraction: 0.1}
datasets: [{name: mnist5k}]
models: [{name: cnn}]
attacks: [{name: badnets, mode: all-to-one, target: 0, rate: 0.1, size: 3}]
defenses:
  - {name: bias-maps, reference_seed: 1, samples_per_class: 20, pair_samples: 0}
  - {name: abl, isolation_epochs: 1, epochs: 2, unlearning_epochs: 1}
seeds: [0]
""")
    r = invoke("bench", grid, "--store", tmp_path / "store", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["done"] == 3 and out["failed"] == 0, out
    by = {c["defense"]: c["metrics"] for c in out["results"]}
    assert by["bias-maps"]["with_reference"] == 1.0
    assert 0.0 <= by["abl"]["isolation_precision"] <= 1.0 and "unlearning.attack_success_rate" in by["abl"]
