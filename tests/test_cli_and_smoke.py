"""The CLI through typer's CliRunner, and the smoke experiment on the embedded mnist5k."""

import json

import pytest
from typer.testing import CliRunner

from backdoorlab.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_list_json():
    r = invoke("list", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert "badnets" in d["attacks"] and "mnist5k" in d["datasets"] and "cnn" in d["models"]
    assert "size" in d["attacks"]["badnets"]["parameters"]


@pytest.mark.slow
def test_smoke_run_mnist5k_badnets(store_root):
    """The default experiment: BadNets 3x3 all-to-one on mnist5k; the backdoor must work."""
    r = invoke("run", "--json", "--store", str(store_root))
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["attack_success_rate"] > 0.9
    assert d["clean_accuracy"] > 0.9
    assert 0 <= d["clean_accuracy"] <= 1 and d["seconds"] > 0
    from pathlib import Path

    run_dir = Path(d["run_dir"])
    for f in ("config.yaml", "metrics.json", "weights.safetensors", "figures/samples.png"):
        assert (run_dir / f).is_file(), f
    # the stored run is listed and shown; the victim is reused from the cache on a second run
    r2 = invoke("runs", "--json", "--store", str(store_root))
    assert d["run_id"] in [x["run_id"] for x in json.loads(r2.stdout)["runs"]]
    r3 = invoke("show", d["run_id"], "--json", "--store", str(store_root))
    shown = json.loads(r3.stdout)
    assert shown["metrics"]["attack_success_rate"] == pytest.approx(d["attack_success_rate"])
    r4 = invoke("run", "--json", "--store", str(store_root), "--set", "name=again")
    d4 = json.loads(r4.stdout)
    assert d4["victim_from_cache"] is True and d4["attack_success_rate"] == pytest.approx(d["attack_success_rate"])
    # the stored weights reload to the same predictions
    from backdoorlab.models import load_model

    m = load_model(run_dir / "weights.safetensors", num_classes=10, input_shape=(1, 28, 28))
    assert m.num_classes == 10


@pytest.mark.slow
def test_source_specific_run_from_yaml(tmp_path, store_root):
    cfg = tmp_path / "e.yaml"
    cfg.write_text("name: s2t\nattack: {mode: source-specific, source: 7, target: 1, rate: 0.3, size: 4}\n"
                   "train: {epochs: 8}\n")
    r = invoke("run", str(cfg), "--json", "--store", str(store_root), "--set", "attack.target=2")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["attack_success_rate"] > 0.9 and d["clean_accuracy"] > 0.9


@pytest.mark.parametrize("args,match", [
    (["run", "--set", "attack.sizee=3"], "attack.sizee: unknown parameter"),
    (["run", "--set", "attack.size=40"], "does not fit"),
    (["run", "--set", "data.name=imagenet"], "known: cifar10, digits"),
    (["run", "--set", "data.name=npz", "--set", "data.path=/nonexistent.npz"], "file not found"),
    (["run", "--set", "attack.rate=0"], "attack.rate"),
    (["run", "--set", "attack.target=12"], "not a class"),
    (["show", "nope"], "no run"),
])
def test_bad_input_exit_2_and_nothing_written(tmp_path, args, match):
    store = tmp_path / "store"
    r = invoke(*args, "--store", str(store))
    assert r.exit_code == 2, r.output
    assert match in " ".join(r.output.split())
    assert "Traceback" not in r.output
    runs = store / "runs"
    assert not runs.exists() or list(runs.iterdir()) == []
