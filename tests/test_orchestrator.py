"""One orchestrator: grid cells run defenses through the same path as `run`, with the same inputs.

Regression tests for two bugs of the two-orchestrator days: grid cells of robust trainers started
from seed 0 whatever the cell's seed, and training-time attacks lost their attack section, so
``target_found`` / ``pair_found`` vanished from their inspector cells."""

from __future__ import annotations

import time

import torch

from backdoorlab.config import load_config


def _cfg(*sets):
    return load_config(None, ["data.train_size=300", "data.test_size=100", "train.epochs=1", *sets])


def test_grid_defense_cells_pass_the_cells_seed(monkeypatch):
    from backdoorlab import engines, experiment
    from backdoorlab.models import ModelSpec, build_model

    seen = {}

    def fake_run_defense(defense, model, prep, ca, asr, batch_size=1024, context=None, seed=0):
        seen["seed"] = seed
        return {"x": 1.0}, {}

    monkeypatch.setattr(experiment, "run_defense", fake_run_defense)
    from backdoorlab.config import DefenseSection

    cfg = _cfg("seed=3").model_copy(update={"defenses": [DefenseSection.model_validate({"name": "abl"})]})
    prep = experiment.prepare(cfg)
    model = build_model(ModelSpec("cnn", 10, prep.train_set.shape))
    out = engines._defense_outcome("c", cfg, prep, model, {"clean_accuracy": 0.5, "attack_success_rate": 0.5},
                                   time.perf_counter())
    assert out.ok and seen["seed"] == 3


def test_training_time_attacks_keep_their_attack_section():
    from backdoorlab import experiment

    cfg = _cfg("attack.name=input-aware", "attack.target=2")
    prep = experiment.prepare(cfg)
    assert prep.attack_section is not None and prep.attack_section.target == 2
    truth = experiment.truth_of(prep)
    assert truth.target == 2 and truth.mode == cfg.attack.mode


def test_inspector_scoring_names_the_target_for_any_attack():
    """The runner's scoring (the one both orchestrators call) reports target_found from the truth."""
    from backdoorlab.defenses.base import InspectionResult, Inspector
    from backdoorlab.evaluation import Applied, Truth, score

    res = InspectionResult(True, [(3, 2)], [2], torch.zeros(4, 4), torch.zeros(4, 4))
    applied = Applied(Inspector(), res, 0.1)
    m = score(applied, Truth(target=2, source=3, mode="source-specific"))
    assert m["target_found"] == 1.0 and m["pair_found"] == 1.0 and m["backdoored"] == 1.0
    assert score(applied, Truth(target=1, mode="all-to-one"))["target_found"] == 0.0
