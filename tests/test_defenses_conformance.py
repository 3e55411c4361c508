"""Registry-driven conformance for the run-time detectors and the repairers: every registered one
runs through its family verbs on a tiny model and synthetic data (types, shapes, determinism, the
input model untouched). Other families have their own conformance tests."""

import pytest
import torch

from backdoorlab.defenses import (
    DEFENSES, DetectionResult, InputDetector, RepairResult, Repairer, RobustTrainer, RobustTrainResult,
)
from backdoorlab.models import ModelSpec, build_model

# parameters per defense for a fast run; every registered repairer and detector must appear here
CASES = {
    "pruning": {"step": 0.25},
    "fine-tuning": {"epochs": 1},
    "fine-pruning": {"step": 0.25, "epochs": 1},
    "strip": {"samples": 4},
    "abl": {"isolation_epochs": 1, "epochs": 2, "unlearning_epochs": 1, "isolation_ratio": 0.05, "batch_size": 16},
}
FAMILIES = ("repairer", "detector", "robust-trainer")


def cases():
    for entry in DEFENSES:
        yield pytest.param(entry.name, id=entry.name)


@pytest.fixture(scope="module")
def setup():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 1, 12, 12), generator=g, dtype=torch.uint8)
    from backdoorlab.types import ImageSet

    data = ImageSet(x, torch.arange(3).repeat(16), 3, name="synthetic")
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", 3, (1, 12, 12), {"width": 4, "hidden": 16})).eval()
    return model, data


@pytest.mark.parametrize("name", list(cases()))
def test_conformance(name, setup):
    family = getattr(DEFENSES.get(name).factory, "family", "")
    if family not in FAMILIES:
        pytest.skip(f"{name} is a {family}; checked elsewhere")
    assert name in CASES, f"defense {name!r} has no conformance parameters in CASES"
    model, data = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d1, d2 = DEFENSES.create(name, **CASES[name]), DEFENSES.create(name, **CASES[name])
    if family == "repairer":
        assert isinstance(d1, Repairer)
        r1, r2 = d1.repair(model, data), d2.repair(model, data)
        assert isinstance(r1, RepairResult) and r1.model is not model
        assert r1.curve and all(isinstance(v, float) for row in r1.curve for v in row.values())
        out = r1.model(data.float_batch(slice(0, 5)))
        assert out.shape == (5, 3) and torch.isfinite(out).all()
        for (k, a), b in zip(r1.model.state_dict().items(), r2.model.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), f"{name} is not deterministic ({k})"
    elif family == "robust-trainer":
        assert isinstance(d1, RobustTrainer)
        runs = []
        for d in (d1, d2):
            torch.manual_seed(1)
            fresh = build_model(ModelSpec("cnn", 3, (1, 12, 12), {"width": 4, "hidden": 16}))
            runs.append(d.train(fresh, data, clean=data))
        r1, r2 = runs
        assert isinstance(r1, RobustTrainResult) and r1.isolated_indices.dtype == torch.int64
        assert r1.isolated_indices.numel() == round(0.05 * len(data)) and torch.equal(r1.isolated_indices, r2.isolated_indices)
        out = r1.model(data.float_batch(slice(0, 5)))
        assert out.shape == (5, 3) and torch.isfinite(out).all()
        for (k, a), b in zip(r1.model.state_dict().items(), r2.model.state_dict().values()):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), f"{name} is not deterministic ({k})"
    else:
        assert isinstance(d1, InputDetector)
        assert d1.fit(model, data) is d1
        d2.fit(model, data)
        res = d1.detect(data.x[:7])
        assert isinstance(res, DetectionResult)
        assert res.scores.shape == (7,) and res.flagged.shape == (7,) and res.flagged.dtype == torch.bool
        assert torch.equal(res.scores, d2.score(data.x[:7])) and torch.equal(res.scores, d1.score(data.float_batch(slice(0, 7))))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), f"{name} modified the input model"
