"""Attacks own their defaults (issue 23, item 1): an attack picked by name alone takes its natural
threat model and its settings for the kind of data at hand; keys the user sets win; ``backdoorlab
list`` shows the defaults."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from backdoorlab.attacks import ATTACKS, DATA_KINDS, apply_attack_defaults, attack_defaults, data_kind
from backdoorlab.cli import app
from backdoorlab.config import AttackSection, DataSection, ExperimentConfig, load_config


def _attack(cfg: ExperimentConfig) -> dict:
    return cfg.attack.model_dump()


@pytest.mark.parametrize("name", ATTACKS.names())
@pytest.mark.parametrize("data", ["mnist5k", "cifar10"])
def test_every_attack_declares_defaults_that_validate(name, data):
    kind = data_kind(data)
    d = attack_defaults(name, kind, data)
    assert d.get("mode") and d.get("epochs"), f"{name} declares no mode or epochs for {kind}"
    cfg = load_config(None, [f"attack.name={name}", f"data.name={data}"])  # no data loaded: nothing to find
    got = _attack(cfg)
    for k, v in d.items():
        assert (cfg.train.epochs if k == "epochs" else got[k]) == v, (name, k)


def test_data_kind_from_name_or_image_shape(tmp_path):
    assert [data_kind(n) for n in ("mnist5k", "mnist", "digits", "cifar10", "gtsrb")] == \
        ["mnist", "mnist", "mnist", "cifar10", "cifar10"]
    np.savez(tmp_path / "rgb.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.arange(4))
    np.savez(tmp_path / "grey.npz", x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.arange(4))
    assert data_kind("npz", {"path": str(tmp_path / "rgb.npz")}) == "cifar10"
    assert data_kind("npz", {"path": str(tmp_path / "grey.npz")}) == "mnist"
    assert data_kind("npz", {"path": str(tmp_path / "missing.npz")}) is None  # the loader reports it later
    assert data_kind("folder", {"path": "x", "grayscale": True}) == "mnist"
    assert data_kind("folder", {"path": "x"}) == "cifar10"
    assert data_kind("some-plugin-source") is None
    cfg = load_config(None, ["attack.name=blend", "data.name=npz", f"data.path={tmp_path / 'rgb.npz'}"])
    assert cfg.attack.extras()["key"] == attack_defaults("blend", "cifar10")["key"]
    # unknown kind: only the kind-independent defaults (SIG is still a clean-label attack)
    assert set(attack_defaults("sig", None)) < set(attack_defaults("sig", "mnist"))
    assert attack_defaults("sig", None)["mode"] == "clean-label"


def test_clean_label_attacks_become_clean_label_by_name():
    for name in ("sig", "clean-label"):
        cfg = load_config(None, [f"attack.name={name}"])
        assert cfg.attack.mode == "clean-label" and cfg.attack.source is None
        cfg.check_components()


def test_a_data_set_refines_its_kind():
    # the embedded 3,800 digits need a stronger warp than full MNIST, which takes the paper's setting
    paper, small = attack_defaults("wanet", "mnist"), attack_defaults("wanet", "mnist", "mnist5k")
    assert (paper["s"], paper["rate"]) == (0.5, 0.1) and small["s"] > paper["s"] and small["rate"] > paper["rate"]
    assert load_config(None, ["attack.name=wanet", "data.name=mnist"]).attack.extras()["s"] == paper["s"]
    assert load_config(None, ["attack.name=wanet"]).attack.extras()["s"] == small["s"]
    assert attack_defaults("wanet", "mnist", "digits") == paper  # no refinement declared: the kind's
    assert attack_defaults("badnets", "mnist", "mnist5k") == attack_defaults("badnets", "mnist")


def test_user_keys_win(tmp_path):
    d = attack_defaults("wanet", "mnist", "mnist5k")
    cfg = load_config(None, ["attack.name=wanet", "attack.s=0.7", "train.epochs=3"])
    assert cfg.attack.extras()["s"] == 0.7 and cfg.train.epochs == 3
    assert cfg.attack.rate == d["rate"] and cfg.attack.extras()["k"] == d["k"]
    # the same from a YAML file, and a --set on top of it
    p = tmp_path / "e.yaml"
    p.write_text("attack: {name: sig, delta: 0.2, rate: 0.5}\ntrain: {epochs: 2, lr: 0.01}\n")
    cfg = load_config(p, ["attack.freq=4"])
    assert (cfg.attack.rate, cfg.attack.extras()["delta"], cfg.attack.extras()["freq"]) == (0.5, 0.2, 4)
    assert cfg.attack.extras()["delta_test"] == attack_defaults("sig", "mnist", "mnist5k")["delta_test"]
    assert cfg.attack.mode == "clean-label" and (cfg.train.epochs, cfg.train.lr) == (2, 0.01)
    # a YAML naming every key (the shipped configs) is taken as written
    full = load_config(None, ["attack.name=blend", "attack.mode=all-to-one", "attack.rate=0.3", "attack.alpha=0.05",
                              "attack.key=kitty", "train.epochs=4"])
    assert (full.attack.rate, full.attack.extras()["alpha"], full.attack.extras()["key"], full.train.epochs) == \
        (0.3, 0.05, "kitty", 4)


def test_another_mode_drops_the_default_threat_model():
    # multiplicative's own threat model is source-specific 8 -> 9; asking for all-to-one takes none of it
    own = load_config(None, ["attack.name=multiplicative"]).attack
    assert (own.mode, own.source, own.target) == ("source-specific", 8, 9)
    cfg = load_config(None, ["attack.name=multiplicative", "attack.mode=all-to-one"])
    assert (cfg.attack.mode, cfg.attack.source, cfg.attack.target, cfg.attack.rate) == ("all-to-one", None, 0, 0.1)
    assert cfg.attack.extras()["factor"] == attack_defaults("multiplicative", "mnist")["factor"]  # strength still


def test_every_entry_point_merges_once():
    # python objects: only the fields set count as the user's
    cfg = ExperimentConfig(attack=AttackSection(name="sig"), data=DataSection(name="mnist5k"))
    assert cfg.attack.mode == "clean-label" and cfg.train.epochs == attack_defaults("sig", "mnist", "mnist5k")["epochs"]
    # a dict (the Python API), a grid cell and a worker re-reading a dumped config: idempotent
    from backdoorlab.api.experiments import _config

    assert _config({"attack": {"name": "sig"}}, []) == cfg
    again = ExperimentConfig.model_validate_json(cfg.model_dump_json())
    assert again == cfg and again.victim_key() == cfg.victim_key()
    # no attack: nothing added; the default experiment keeps its BadNets and 10 epochs
    assert load_config(None, ["attack=null"]).attack is None
    base = ExperimentConfig()
    assert base.attack.name == "badnets" and base.attack.mode == "all-to-one" and base.train.epochs == 10
    # the raw mapping is not changed in place; what is not a mapping is left for validation
    doc = {"attack": {"name": "sig"}}
    apply_attack_defaults(doc)
    assert doc == {"attack": {"name": "sig"}}
    assert apply_attack_defaults("nonsense") == "nonsense"
    assert apply_attack_defaults({"attack": {"name": "no-such-attack"}}) == {"attack": {"name": "no-such-attack"}}


def test_list_shows_the_defaults():
    r = CliRunner().invoke(app, ["list", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    for name, entry in doc["attacks"].items():
        assert {"description", "parameters", "defaults"} <= set(entry)
        assert set(DATA_KINDS) <= set(entry["defaults"])
        assert entry["defaults"]["mnist"] == attack_defaults(name, "mnist")
        assert entry["defaults"]["cifar10"] == attack_defaults(name, "cifar10")
    assert doc["attacks"]["sig"]["defaults"]["mnist"]["mode"] == "clean-label"
    assert doc["attacks"]["wanet"]["defaults"]["mnist5k"] == attack_defaults("wanet", "mnist", "mnist5k")
    assert "defaults" not in doc["datasets"]["mnist5k"]  # the other registries as before
    r = CliRunner().invoke(app, ["list"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "mode clean-label" in r.stdout and "cifar10:" in r.stdout and "on mnist5k:" in r.stdout


def test_sig_by_name_poisons_clean_label_on_mnist5k():
    """No training: the poisoned set of `--set attack.name=sig` keeps every label and stamps class 0 only."""
    from backdoorlab.experiment import prepare

    cfg = load_config(None, ["attack.name=sig"])
    prep = prepare(cfg)
    p, t, train = prep.train_set, prep.triggered_test, prep.splits.train
    assert torch.equal(p.y, train.y)
    assert bool(torch.all(train.y[p.is_poison] == 0)) and int(p.is_poison.sum()) == int((train.y == 0).sum())
    assert bool(torch.all(t.y_source != 0)) and bool(torch.all(t.y == 0))


@pytest.mark.slow
def test_attacks_by_name_reach_their_asr_on_a_mnist5k_subset(store_root):
    """`run --set attack.name=X` alone, on 2,000 training digits: the backdoor is planted (with a margin
    under the full-size figures) without costing the clean accuracy."""
    runner = CliRunner()
    small = ["--json", "--store", str(store_root), "--set", "data.train_size=2000", "--set", "threads=2"]
    for name, asr_min in (("blend", 0.8), ("sig", 0.8)):
        r = runner.invoke(app, ["run", *small, "--set", f"attack.name={name}"])
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        assert d["attack_success_rate"] >= asr_min and d["clean_accuracy"] >= 0.9, (name, d)
