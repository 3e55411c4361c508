"""Population statistics: ROC / AUROC over models, calibration on one seed half, refusal of bad populations."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

from backdoorlab.population import calibrated_threshold, summarise, tables, tpr_at_fpr
from backdoorlab.report import Row


def _row(attack, seed, score, flagged, found=0.0, model="cnn", defense="pairwise"):
    m = {"max_anomaly": score, "backdoored": float(flagged), "target_found": found}
    return Row("mnist", model, attack, defense, "inspector", seed, "done", m)


def test_calibration_uses_only_the_first_seed_half():
    rows = [_row("none", 0, s, s > 3) for s in (1.0, 2.0, 2.5)] + [_row("badnets", 0, 9.0, True, 1.0)]
    # the evaluation half has a clean model scoring 2.6: above every calibration score, so it is a false alarm;
    # a backdoored model at 2.4 is below the calibrated threshold although above most clean ones
    rows += [_row("none", 1, 2.6, False), _row("none", 1, 0.5, False), _row("badnets", 1, 8.0, True, 1.0),
             _row("badnets", 1, 2.4, False)]
    (s,) = summarise(rows)
    assert s.seeds == ([0], [1])
    assert 2.5 < s.threshold < 2.5001  # just above the largest clean calibration score, nothing from seed 1
    cal = s.rates(s.evaluation, s.threshold)
    assert (cal["false_alarms"], cal["tpr"], cal["found"]) == (1.0, 0.5, 0.5)
    own = s.rates(s.evaluation)
    assert own["false_alarms"] == 0.0 and own["tpr"] == 0.5
    assert own["auroc"] == pytest.approx(0.75)  # 8.0 beats both clean, 2.4 beats one of two


def test_tpr_at_fpr_and_threshold_edge_cases():
    s = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.8, 0.25], dtype=torch.float64)
    t = torch.tensor([False, False, False, True, True, True])
    assert tpr_at_fpr(s, t, 0.05) == pytest.approx(2 / 3)  # no false alarm allowed: above 0.3
    assert tpr_at_fpr(s, t, 0.34) == pytest.approx(1.0)  # one allowed: above 0.2
    assert calibrated_threshold([float("nan")]) == math.inf


def test_tables_report_per_trigger_and_architecture():
    rows = [_row("none", sd, 1.0 + 0.1 * sd, False, model=m) for sd in (0, 1) for m in ("cnn", "mlp")]
    rows += [_row(a, sd, 5.0, True, 1.0, model="cnn") for sd in (0, 1) for a in ("patch", "blend")]
    ids = [t[0] for t in tables(rows)]
    assert ids == ["population", "population-triggers", "population-architectures"]
    assert tables([r for r in rows if r.seed == 0]) == []  # one seed: no calibration / evaluation split


def test_tables_add_input_and_sample_level_distributions():
    rows = [_row("none", sd, 1.0, False) for sd in (0, 1)] + [_row("patch", sd, 5.0, True, 1.0) for sd in (0, 1)]
    rows += [Row("mnist", "cnn", "patch", "strip", "detector", sd, "done", {"frr": 0.01, "far": far})
             for sd, far in ((0, 0.1), (1, 0.3), (2, 0.9))]
    rows += [Row("mnist", "cnn", "none", "strip", "detector", 0, "done", {"frr": 0.02, "far": 0.0})]  # clean: left out
    rows += [Row("mnist", "cnn", "blend", "pattern-subtraction", "cleanser", 0, "done", {"tpr": 0.9, "fpr": 0.01})]
    got = {t[0]: t for t in tables(rows)}
    assert got["population-inputs"][3] == [["strip", "patch", "3", "0.010 (0.010-0.010)", "0.300 (0.100-0.900)"]]
    assert got["population-samples"][3] == [["pattern-subtraction", "blend", "1", "0.900 (0.900-0.900)",
                                             "0.010 (0.010-0.010)"]]


@pytest.mark.parametrize("attacks, seeds, words", [
    ([{"name": "badnets", "target": 0}], [0, 1], "no clean models"),
    ([None], [0, 1], "no backdoored models"),
    ([None, {"name": "badnets", "target": 0}], [0], "at least 2"),
])
def test_population_command_refuses_a_population_without_a_roc(tmp_path, attacks, seeds, words):
    from backdoorlab.cli import app

    grid = tmp_path / "pop.yaml"
    grid.write_text(yaml.safe_dump({"name": "pop", "attacks": attacks, "seeds": seeds,
                                    "defenses": [{"name": "pairwise"}]}))
    r = CliRunner().invoke(app, ["population", str(grid), "--store", str(tmp_path / "store")])
    assert r.exit_code == 2 and words in r.output, r.output
    assert not (tmp_path / "store" / "runs").exists() or not any((tmp_path / "store" / "runs").iterdir())


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_shipped_populations_expand_with_clean_models_in_both_halves(name):
    """Each shipped population builds its cells (every model and attack setting valid) and holds what
    its report needs: clean models in the calibration half (>= 3, the null's minimum) and backdoored
    and clean models in the evaluation half."""
    from pathlib import Path

    from backdoorlab.grid import load_grid
    from backdoorlab.population import check_population

    g = load_grid(Path(__file__).resolve().parents[1] / "configs" / "populations" / f"{name}.yaml")
    check_population(g.spec)
    victims = [c for c in g.cells if c.kind == "victim"]
    first = min(g.spec.seeds)
    assert sum(c.attack == "none" and c.seed == first for c in victims) >= 3
    evaluation = [c for c in victims if c.seed != first]
    assert any(c.attack == "none" for c in evaluation) and any(c.attack != "none" for c in evaluation)
    assert len({c.model for c in victims}) >= 3


def test_an_attack_mode_the_attack_cannot_run_is_refused_when_the_grid_loads(tmp_path):
    """SIG is clean-label only: a population asking for it all-to-one is refused at load time, naming
    the cell, the attack and the modes it supports (not after training the other cells)."""
    from backdoorlab.errors import BackdoorLabError
    from backdoorlab.grid import load_grid

    grid = tmp_path / "pop.yaml"
    grid.write_text(yaml.safe_dump({"name": "pop", "datasets": [{"name": "cifar10"}], "seeds": [0, 1],
                                    "attacks": [None, {"name": "sig", "mode": "all-to-one", "target": 2, "label": "sig-a2o"}],
                                    "defenses": [{"name": "pairwise"}]}))
    with pytest.raises(BackdoorLabError, match=r"sig-a2o.*attack\.mode: sig supports clean-label; got 'all-to-one'"):
        load_grid(grid)
    ok = yaml.safe_load(grid.read_text())
    ok["attacks"][1]["mode"] = "clean-label"
    grid.write_text(yaml.safe_dump(ok))
    assert {c.attack for c in load_grid(grid).cells} == {"none", "sig-a2o"}


def test_extra_clean_models_match_the_mnist_population():
    """configs/populations/mnist_clean_extra.yaml (more clean calibration models for the per-architecture
    nulls, docs/populations.md) trains the population's settings clean, with seeds the population does
    not use: the same data, models, base training and overrides, so that its models are draws of the same
    clean distribution."""
    from pathlib import Path

    import yaml

    from backdoorlab.grid import load_grid

    root = Path(__file__).resolve().parents[1] / "configs" / "populations"
    pop, extra = (yaml.safe_load((root / f).read_text()) for f in ("mnist.yaml", "mnist_clean_extra.yaml"))
    for key in ("base", "datasets", "models", "overrides"):
        assert extra[key] == pop[key], key
    assert extra["attacks"] == [None] and not extra.get("defenses")
    assert not set(extra["seeds"]) & set(pop["seeds"])
    g = load_grid(root / "mnist_clean_extra.yaml")
    assert len(g.cells) == len(pop["datasets"]) * len(pop["models"]) * len(extra["seeds"])
    assert {c.attack for c in g.cells} == {"none"}
