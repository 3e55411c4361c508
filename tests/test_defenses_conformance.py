"""Registry-driven conformance of every registered defense, in all five families, on a tiny CNN
and synthetic 12x12 data: the family verb with exactly its declared arguments (never the ground
truth), the result's types and shapes, determinism, the inputs untouched, and the hooks
(``metrics`` floats, ``figures`` PNG bytes, ``summary`` JSON, ``report_keys``).

A new defense is covered without editing this file: ``FAST`` only shrinks the built-ins' defaults
so that the whole file runs in seconds (a defense not listed runs with its defaults)."""

from __future__ import annotations

import inspect as pyinspect
import json

import pytest
import torch
from torch import nn

from backdoorlab.attacks import ATTACKS, poison, poison_test
from backdoorlab.defenses import (
    DEFENSES, FAMILIES, CleanseResult, Cleanser, Defense, DetectionResult, InputDetector, InspectionResult, Inspector,
    RepairResult, Repairer, RobustTrainer, RobustTrainResult,
)
from backdoorlab.models import ModelSpec, build_model
from backdoorlab.types import ImageSet, PoisonedSet

K, SHAPE = 3, (1, 12, 12)
SPEC = ModelSpec("cnn", K, SHAPE, {"width": 4, "hidden": 16})

# smaller than the defaults, for speed only (not needed for a new defense to be tested)
FAST: dict[str, dict] = {
    "pruning": {"step": 0.25},
    "fine-tuning": {"epochs": 1},
    "fine-pruning": {"step": 0.25, "epochs": 1},
    "strip": {"samples": 4},
    "abl": {"isolation_epochs": 1, "epochs": 2, "unlearning_epochs": 1, "isolation_ratio": 0.05, "batch_size": 16},
    "pairwise": {"images_per_class": 8, "opt_images": 4, "select_images": 4, "steps": 5, "seed_steps": 3,
                 "bisection_steps": 2},
    "neural-cleanse": {"images_per_class": 4, "steps": 5},
    "bias-maps": {"samples_per_class": 8, "pair_samples": 2, "iterations": 2, "stamp_images": 16, "min_group": 2},
    "pattern-subtraction": {"images_per_class": 8, "search_samples": 16},
}

FAMILY_CLASS = {"inspector": Inspector, "cleanser": Cleanser, "detector": InputDetector, "repairer": Repairer,
                "robust-trainer": RobustTrainer}
VERBS = {Inspector: ("inspect",), Cleanser: ("cleanse",), InputDetector: ("fit", "score", "detect"),
         Repairer: ("repair",), RobustTrainer: ("train",)}
GROUND_TRUTH_WORDS = ("truth", "is_poison", "poison", "y_source", "triggered", "eval_")


def _names() -> list:
    return [pytest.param(e.name, id=e.name) for e in DEFENSES]


def _make(name: str) -> Defense:
    return DEFENSES.create(name, **FAST.get(name, {}))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(SPEC).eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol, equal_nan=True) for k in a)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread is much faster than several on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(one_thread):
    """A suspect model, the poisoned training set (with its truth), the defender's clean set and
    clean / triggered test inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, *SHAPE), generator=g, dtype=torch.uint8)
    train = ImageSet(x, torch.arange(K).repeat(16), K, name="synthetic")
    clean = ImageSet(torch.randint(0, 256, (36, *SHAPE), generator=g, dtype=torch.uint8), torch.arange(K).repeat(12), K,
                     name="clean")
    attack = ATTACKS.create("badnets", size=2)
    poisoned = poison(train, attack, rate=0.25, target=2, generator=torch.Generator().manual_seed(1))
    triggered = poison_test(clean, attack, target=2)
    return {"model": _model(0), "poisoned": poisoned, "data": poisoned.without_ground_truth(), "clean": clean,
            "test_x": clean.x[:7], "triggered_x": triggered.x[:7]}


def _check_hooks(d: Defense, result, truth: torch.Tensor | None) -> None:
    m = d.metrics(result)
    assert isinstance(m, dict) and all(isinstance(k, str) and type(v) is float for k, v in m.items()), m
    keys = type(d).report_keys
    assert isinstance(keys, tuple) and all(isinstance(k, str) for k in keys)
    assert set(keys) <= set(m), f"report_keys {keys} not all produced by metrics(): {sorted(m)}"
    for t in {None, truth} if truth is not None else {None}:
        figs = d.figures(result, t)
        assert isinstance(figs, dict)
        for stem, png in figs.items():
            assert isinstance(stem, str) and stem and "/" not in stem
            assert isinstance(png, bytes) and png.startswith(b"\x89PNG\r\n\x1a\n"), stem
    s = d.summary(result)
    assert isinstance(s, dict)
    json.dumps(s)  # JSON-ready: no tensors, no tuples as keys


def test_every_defense_is_one_of_the_five_families():
    assert set(FAMILIES) == set(FAMILY_CLASS)
    for e in DEFENSES:
        fam = getattr(e.factory, "family", "")
        assert fam in FAMILIES, f"{e.name}: family {fam!r}"
        assert isinstance(e.factory, type) and issubclass(e.factory, FAMILY_CLASS[fam]), e.name
        assert e.description, f"{e.name} has no one-line description"
        d = _make(e.name)
        assert d.describe() and (d.wants_reference() is None or isinstance(d.wants_reference(), int))


@pytest.mark.parametrize("name", _names())
def test_verbs_take_exactly_the_family_arguments(name):
    """The declared contract is the real one: a verb takes what its family base declares, with the
    same kinds and defaults (plus optional keywords at most), and nothing named after the ground truth."""
    cls = DEFENSES.get(name).factory
    base = FAMILY_CLASS[cls.family]
    for verb in VERBS[base]:
        want = pyinspect.signature(getattr(base, verb)).parameters
        got = pyinspect.signature(getattr(cls, verb)).parameters
        assert list(got)[:len(want)] == list(want), f"{name}.{verb}{tuple(got)} differs from {base.__name__}.{verb}{tuple(want)}"
        for p in want:
            assert (got[p].kind, got[p].default) == (want[p].kind, want[p].default), f"{name}.{verb}: {p}"
        for p in list(got)[len(want):]:  # extras (e.g. progress callbacks): optional keywords the runner never passes
            assert got[p].kind is got[p].KEYWORD_ONLY and got[p].default is not got[p].empty, f"{name}.{verb}: {p} is required"
        assert not any(w in p for p in got for w in GROUND_TRUTH_WORDS), f"{name}.{verb}{tuple(got)}"


@pytest.mark.parametrize("name", _names())
def test_conformance(name, world):
    model, data, clean = world["model"], world["data"], world["clean"]
    assert not isinstance(data, PoisonedSet) and not hasattr(data, "is_poison")
    before = _state(model)
    inputs = {k: (v.x.clone(), v.y.clone()) for k, v in (("data", data), ("clean", clean))}
    d1, d2 = _make(name), _make(name)
    fam = d1.family
    truth: torch.Tensor | None = None
    n = len(data)

    if fam == "inspector":
        seed = d1.wants_reference()
        ref = _model(100 + seed) if seed is not None else None
        ref_state = _state(ref) if ref is not None else None
        r1, r2 = d1.inspect(model, clean, reference=ref), d2.inspect(model, clean, reference=ref)
        assert isinstance(r1, InspectionResult) and isinstance(r1.backdoored, bool)
        assert r1.scores.shape in ((K, K), (K,)) and r1.anomaly.shape == r1.scores.shape
        assert all(isinstance(p, tuple) and len(p) == 2 and all(isinstance(c, int) and 0 <= c < K for c in p)
                   for p in r1.flagged_pairs)
        assert all(isinstance(t, int) and 0 <= t < K for t in r1.flagged_targets)
        assert isinstance(r1.threshold, float) and isinstance(r1.threshold_source, str)
        assert r1.patterns is None or (r1.patterns.dim() >= 3 and tuple(r1.patterns.shape[-3:]) == SHAPE)
        assert torch.allclose(r1.scores.double(), r2.scores.double(), equal_nan=True), f"{name} is not deterministic"
        assert (r1.backdoored, r1.flagged_pairs, r1.flagged_targets) == (r2.backdoored, r2.flagged_pairs, r2.flagged_targets)
        if ref is not None:
            assert _same_state(ref_state, _state(ref)), f"{name} modified the reference model"
        result = r1
    elif fam == "cleanser":
        r1 = d1.cleanse(model, data, clean=clean)
        insp = d2.inspector()
        if insp is not None:  # an inspection run by the runner gives the same result as the cleanser's own
            assert isinstance(insp, Inspector)
            r2 = d2.cleanse(model, data, clean=clean, inspection=insp.inspect(model, clean))
        else:
            r2 = d2.cleanse(model, data, clean=clean)
        assert isinstance(r1, CleanseResult)
        assert r1.scores.shape == (n,) and r1.scores.is_floating_point()
        assert r1.flagged.shape == (n,) and r1.flagged.dtype == torch.bool
        assert r1.corrected_labels.shape == (n,) and r1.corrected_labels.dtype == torch.int64
        assert int(r1.corrected_labels.min()) >= 0 and int(r1.corrected_labels.max()) < K
        assert isinstance(r1.threshold, float)
        assert torch.allclose(r1.scores, r2.scores, equal_nan=True) and torch.equal(r1.flagged, r2.flagged)
        result, truth = r1, world["poisoned"].is_poison
    elif fam == "detector":
        assert d1.fit(model, clean) is d1
        d2.fit(model, clean)
        res = d1.detect(world["test_x"])
        assert isinstance(res, DetectionResult) and isinstance(res.threshold, float)
        assert res.scores.shape == (7,) and res.flagged.shape == (7,) and res.flagged.dtype == torch.bool
        assert torch.equal(res.scores, d2.score(world["test_x"]))
        assert torch.equal(res.scores, d1.score(world["test_x"].float().div(255)))  # uint8 or float in [0, 1]
        trig = d1.detect(world["triggered_x"])
        # what the runner hands the figures hook: both passes together, truth True = triggered
        result = DetectionResult(torch.cat([res.scores, trig.scores]), torch.cat([res.flagged, trig.flagged]), res.threshold)
        truth = torch.cat([torch.zeros(7, dtype=torch.bool), torch.ones(7, dtype=torch.bool)])
    elif fam == "repairer":
        calls = []

        def evaluate(m: nn.Module) -> dict[str, float]:
            calls.append(1)
            return {"clean_accuracy": 0.5, "attack_success_rate": 0.5}

        r1, r2 = d1.repair(model, clean), d2.repair(model, clean, evaluate=evaluate)
        assert isinstance(r1, RepairResult) and r1.model is not model
        assert isinstance(r1.curve, list)
        assert all(isinstance(row, dict) and all(isinstance(v, float) for v in row.values()) for row in r1.curve)
        out = r1.model(clean.float_batch(slice(0, 5)))
        assert out.shape == (5, K) and torch.isfinite(out).all()
        assert _same_state(_state(r1.model), _state(r2.model), atol=1e-6), f"{name}: not deterministic, or steered by evaluate"
        result = r1
    else:  # robust-trainer
        runs = []
        for d, ev in ((d1, None), (d2, lambda m: {"clean_accuracy": 0.5})):
            fresh = _model(1)
            runs.append(d.train(fresh, data, clean=clean, evaluate=ev))
        r1, r2 = runs
        assert isinstance(r1, RobustTrainResult)
        idx = r1.isolated_indices
        assert idx.dtype == torch.int64 and idx.dim() == 1 and idx.unique().numel() == idx.numel()
        assert bool(((idx >= 0) & (idx < n)).all())
        assert r1.sample_scores is None or r1.sample_scores.shape == (n,)
        assert r1.loss_traces is None or (r1.loss_traces.dim() == 2 and r1.loss_traces.shape[1] == n)
        assert all(isinstance(v, float) for m in r1.phases.values() for v in m.values())
        out = r1.model(clean.float_batch(slice(0, 5)))
        assert out.shape == (5, K) and torch.isfinite(out).all()
        assert torch.equal(idx, r2.isolated_indices)
        assert _same_state(_state(r1.model), _state(r2.model), atol=1e-6), f"{name}: not deterministic, or steered by evaluate"
        result, truth = r1, world["poisoned"].is_poison

    _check_hooks(d1, result, truth)
    assert _same_state(before, _state(model)), f"{name} modified the input model"
    for k, v in (("data", data), ("clean", clean)):
        assert torch.equal(v.x, inputs[k][0]) and torch.equal(v.y, inputs[k][1]), f"{name} modified {k}"


# ----------------------------------------------------------------------------- the runner side
class _Recorder:
    received: list

    def _seen(self, verb: str, *args, **kw) -> None:
        self.received.append((verb, args, kw))


class _Inspector(_Recorder, Inspector):
    def inspect(self, model, clean, *, reference=None):
        self._seen("inspect", model, clean, reference=reference)
        return InspectionResult(False, [], [], torch.zeros(K), torch.zeros(K))


class _Cleanser(_Recorder, Cleanser):
    def cleanse(self, model, data, *, clean=None, inspection=None):
        self._seen("cleanse", model, data, clean=clean, inspection=inspection)
        n = len(data)
        return CleanseResult(torch.zeros(n), torch.zeros(n, dtype=torch.bool), data.y.clone(), 0.0)


class _Detector(_Recorder, InputDetector):
    def fit(self, model, clean):
        self._seen("fit", model, clean)
        return self

    def score(self, x):
        return torch.zeros(x.shape[0])

    def detect(self, x):
        return DetectionResult(self.score(x), torch.zeros(x.shape[0], dtype=torch.bool), 0.0)


class _Repairer(_Recorder, Repairer):
    def repair(self, model, clean, *, evaluate=None):
        self._seen("repair", model, clean, evaluate=evaluate)
        return RepairResult(_model(0), [])


class _Trainer(_Recorder, RobustTrainer):
    def train(self, model, data, *, clean=None, evaluate=None):
        self._seen("train", model, data, clean=clean, evaluate=evaluate)
        return RobustTrainResult(model, torch.zeros(0, dtype=torch.int64))


@pytest.mark.parametrize("cls", [_Inspector, _Cleanser, _Detector, _Repairer, _Trainer], ids=lambda c: c.family)
def test_the_runner_never_passes_the_ground_truth(cls, world):
    """``evaluation.apply_defense`` given the poisoned set (ground truth attached): each family's
    verb receives only its declared arguments, and no data set carrying ``is_poison``."""
    from backdoorlab.evaluation import apply_defense

    d = cls()
    d.received = []
    apply_defense(d, _model(1), clean=world["clean"], data=world["poisoned"], test_inputs=world["test_x"],
                  triggered_inputs=world["triggered_x"])
    assert d.received, f"apply_defense never called the {cls.family} verb"
    for verb, args, kw in d.received:
        allowed = set(pyinspect.signature(getattr(FAMILY_CLASS[cls.family], verb)).parameters) - {"self"}
        assert set(kw) <= allowed, (verb, sorted(kw))
        for v in (*args, *kw.values()):
            assert not isinstance(v, PoisonedSet) and not hasattr(v, "is_poison"), (verb, type(v))
