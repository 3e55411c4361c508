import pytest

from backdoorlab.config import ExperimentConfig, apply_overrides, load_config
from backdoorlab.errors import BackdoorLabError


def test_defaults_and_overrides():
    cfg = load_config(None, ["attack.target=1", "data.name=digits", "train.epochs=3", "attack.size=2"])
    assert cfg.attack.target == 1 and cfg.data.name == "digits" and cfg.train.epochs == 3
    assert cfg.attack.extras() == {"size": 2}
    assert load_config(None, ["attack=null"]).attack is None


def test_yaml_file_and_errors(tmp_path):
    p = tmp_path / "e.yaml"
    p.write_text("name: x\nseed: 3\nattack: {name: badnets, mode: source-specific, source: 7, target: 1, size: 2}\n")
    cfg = load_config(p, ["attack.rate=0.08"])
    assert cfg.seed == 3 and cfg.attack.source == 7 and cfg.attack.rate == 0.08
    for bad, match in [
        (["colour=red"], "colour: unknown key"),
        (["train.epochs=abc"], "train.epochs"),
        (["attack.rate=2"], "attack.rate"),
        (["attack.name=nope"], "unknown attack 'nope'"),
        (["attack.shape=hexagon"], "attack.shape"),
        (["data.path=x.npz"], "data.path: unknown parameter of data set 'mnist5k'"),
        (["model.depth=3"], "model.depth"),
        (["attack.mode=source-specific"], "attack.source"),
        (["noequals"], "KEY=VALUE"),
    ]:
        with pytest.raises(BackdoorLabError, match=match):
            load_config(None, bad)
    with pytest.raises(BackdoorLabError, match="not found"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(BackdoorLabError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_victim_key_changes_with_what_matters():
    a = ExperimentConfig()
    assert a.victim_key() == ExperimentConfig().victim_key()
    assert a.victim_key() != load_config(None, ["seed=1"]).victim_key()
    assert a.victim_key() != load_config(None, ["attack.size=4"]).victim_key()
    assert a.victim_key() == load_config(None, ["name=other"]).victim_key()


def test_apply_overrides_does_not_mutate():
    doc = {"a": {"b": 1}}
    out = apply_overrides(doc, ["a.b=2", "c.d=[1, 2]"])
    assert doc == {"a": {"b": 1}} and out == {"a": {"b": 2}, "c": {"d": [1, 2]}}
