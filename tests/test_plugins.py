"""A new attack and a new defense, each one module of a package written here (outside the source
tree), found through ``BACKDOORLAB_PLUGINS`` by ``backdoorlab list``, a YAML experiment, a grid (in
spawned worker processes) and the report, touching no other file.

The commands run in fresh processes, as a user runs them: the plugins are loaded from the
environment, not from this test's imports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MY_ATTACK = '''
"""pixel-corner: a 2x2 patch in the top-left corner (a plugin attack)."""

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from backdoorlab.attacks.base import ATTACKS, Attack


@ATTACKS.register("pixel-corner", "a 2x2 patch in the top-left corner (plugin)")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class PixelCorner(Attack):
    value: float = Field(1.0, ge=0.0, le=1.0, description="the patch's intensity")

    def apply_trigger(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        out = x.clone()
        out[..., :2, :2] = self.value
        return out
'''

MY_DEFENSE = '''
"""zero-last-bias: a copy of the model with its last Linear bias zeroed (a plugin repairer)."""

import copy

import torch
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass
from torch import nn

from backdoorlab.defenses.base import DEFENSES, RepairResult, Repairer


@DEFENSES.register("zero-last-bias", "zero the bias of the last Linear layer; nothing fine-tuned (plugin)")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ZeroLastBias(Repairer):
    report_keys = ("zeroed",)

    def repair(self, model, clean, *, evaluate=None):
        new = copy.deepcopy(model)
        last = [m for m in new.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            last.bias.zero_()
        curve = [{k: float(v) for k, v in evaluate(new).items()}] if evaluate is not None else []
        return RepairResult(new, curve)

    def metrics(self, result):
        return {"zeroed": 1.0}
'''

DATA = "{name: mnist5k, train_size: 600, test_size: 200, holdout_fraction: 0.1}"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("plugins")
    pkg = root / "myplugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""Methods of my own."""\n')
    (pkg / "my_attack.py").write_text(MY_ATTACK)
    (pkg / "my_defense.py").write_text(MY_DEFENSE)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", BACKDOORLAB_PLUGINS="myplugins")
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def cli(env: dict[str, str], *args, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from backdoorlab.cli import main; main()", *map(str, args)],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _ok(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, f"exit {p.returncode}\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-4000:]}"
    return json.loads(p.stdout)


def _report(env, store: Path, target: str, out: Path) -> dict:
    d = _ok(cli(env, "report", target, "--store", store, "--out", out, "--json"))
    assert d
    return json.loads((out / "report.json").read_text())


def _plugin_rows(doc: dict) -> tuple[list[dict], list[str], list[list[str]]]:
    cells = [c for c in doc["cells"] if c["defense"] == "zero-last-bias"]
    table = doc["tables"]["ca-asr"]
    return cells, table["columns"], [r for r in table["rows"] if r[3] == "zero-last-bias"]


def test_plugins_in_list(plugin_env):
    d = _ok(cli(plugin_env, "list", "--json"))
    assert "pixel-corner" in d["attacks"] and d["attacks"]["pixel-corner"]["parameters"] == ["value"]
    assert "2x2 patch" in d["attacks"]["pixel-corner"]["description"]
    assert "zero-last-bias" in d["defenses"]
    assert "badnets" in d["attacks"] and "strip" in d["defenses"]  # the built-ins are still there
    without = _ok(cli({k: v for k, v in plugin_env.items() if k != "BACKDOORLAB_PLUGINS"}, "list", "--json"))
    assert "pixel-corner" not in without["attacks"] and "zero-last-bias" not in without["defenses"]


def test_plugin_that_fails_to_import_is_one_clear_error(plugin_env, tmp_path):
    p = cli(dict(plugin_env, BACKDOORLAB_PLUGINS="myplugins,no_such_plugin_module"), "list", "--json")
    assert p.returncode == 2, p.stderr
    msg = " ".join((p.stdout + p.stderr).split())
    assert "no_such_plugin_module" in msg and "ModuleNotFoundError" in msg and "Traceback" not in msg


@pytest.mark.slow
def test_plugins_in_a_yaml_experiment_and_its_report(plugin_env, tmp_path):
    cfg = tmp_path / "plugin_run.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: plugin-run
        data: {DATA}
        model: {{name: cnn}}
        attack: {{name: pixel-corner, mode: all-to-one, target: 0, rate: 0.1}}
        train: {{epochs: 1, batch_size: 64}}
        defenses: [{{name: zero-last-bias}}]
        """))
    store = tmp_path / "store"
    d = _ok(cli(plugin_env, "run", cfg, "--json", "--store", store))
    assert 0.0 <= d["attack_success_rate"] <= 1.0 and d["poison_count"] > 0
    run_dir = Path(d["run_dir"])
    assert "pixel-corner" in (run_dir / "config.yaml").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    flat = json.dumps(metrics)
    assert "zero-last-bias" in flat and "zeroed" in flat, metrics
    doc = _report(plugin_env, store, d["run_id"], tmp_path / "report")
    cells, columns, rows = _plugin_rows(doc)
    assert len(cells) == 1 and cells[0]["metrics"]["zeroed"] == 1.0 and cells[0]["attack"] == "pixel-corner"
    assert cells[0]["family"] == "repairer"
    assert "zeroed" in columns and len(rows) == 1 and rows[0][columns.index("zeroed")] == "1.000"


@pytest.mark.slow
def test_plugins_in_a_grid_with_worker_processes_and_its_report(plugin_env, tmp_path):
    grid = tmp_path / "plugin_grid.yaml"
    grid.write_text(textwrap.dedent(f"""\
        name: plugin-grid
        base:
          train: {{epochs: 1, batch_size: 64}}
          data: {DATA}
        datasets: [{{name: mnist5k}}]
        models: [{{name: cnn}}]
        attacks:
          - {{name: pixel-corner, mode: all-to-one, target: 0, rate: 0.1}}
          - {{name: badnets, mode: all-to-one, target: 0, rate: 0.1, size: 3}}
        defenses: [{{name: zero-last-bias}}]
        seeds: [0]
        """))
    store = tmp_path / "store"
    d = _ok(cli(plugin_env, "bench", grid, "--store", store, "--workers", "2", "--json"))
    assert d["cells"] == d["done"] == 4 and d["failed"] == 0, d
    by = {(c["attack"], c["defense"]): c for c in d["results"]}
    assert by[("pixel-corner", "zero-last-bias")]["metrics"]["zeroed"] == 1.0
    assert by[("badnets", "zero-last-bias")]["metrics"]["zeroed"] == 1.0
    assert "attack_success_rate" in by[("pixel-corner", "none")]["metrics"]
    doc = _report(plugin_env, store, "plugin-grid", tmp_path / "report")
    cells, columns, rows = _plugin_rows(doc)
    assert {c["attack"] for c in cells} == {"pixel-corner", "badnets"} and all(c["status"] == "done" for c in cells)
    assert all(c["metrics"]["zeroed"] == 1.0 and c["family"] == "repairer" for c in cells)
    assert "zeroed" in columns and {r[2] for r in rows} == {"pixel-corner", "badnets"}
    assert all(r[columns.index("zeroed")] == "1.000" for r in rows)
    assert any("pixel-corner" in r[0] for r in doc["tables"]["der-matrix"]["rows"])
