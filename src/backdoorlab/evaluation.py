"""Running a defense by its family's contract, and scoring it with the ground truth.

:func:`apply_defense` gives a defense exactly what its family's verb declares
(:mod:`backdoorlab.defenses.base`): the model, the defender's clean set, the training set without
``is_poison``, a reference model or an earlier inspection when the method asks for one, and an
evaluation callback that hides the test data. :func:`score` then computes every number that needs
the truth (TPR / FPR, isolation precision, FRR / FAR, target found, CA / ASR / DER) from what the
defense returned. Both the single-run orchestrator and the grid engines call these two functions,
so a defense is run and scored in one way everywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from backdoorlab import metrics as M
from backdoorlab.defenses.base import Defense, Evaluate, InspectionResult
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet


@dataclass(frozen=True, eq=False)
class Truth:
    """What the runner knows and the defense never sees. ``is_poison`` / ``y_source`` (N,) of the
    training set; the attack's ``target`` / ``source`` / ``mode``; the clean test set and the
    triggered test set (labelled with the target) for CA / ASR; the victim's CA / ASR."""

    is_poison: torch.Tensor | None = None
    y_source: torch.Tensor | None = None
    target: int | None = None
    source: int | None = None
    mode: str | None = None
    test: ImageSet | None = None
    triggered: ImageSet | None = None
    ca_before: float | None = None
    asr_before: float | None = None


@dataclass(frozen=True, eq=False)
class Applied:
    """A defense's result, with the inputs the scoring needs (a detector's two passes)."""

    defense: Defense
    result: Any
    seconds: float
    detection: dict[str, Any] = field(default_factory=dict)  # detectors: {"clean": DetectionResult, "triggered": ...}


def make_evaluator(test: ImageSet | None, triggered: ImageSet | None, batch_size: int = 1024) -> Evaluate | None:
    """``evaluate(model) -> {"clean_accuracy", "attack_success_rate"}`` on the given sets (None when neither)."""
    if test is None and triggered is None:
        return None

    def evaluate(model: nn.Module) -> dict[str, float]:
        from backdoorlab.train import evaluate as accuracy

        out: dict[str, float] = {}
        if test is not None and len(test):
            out["clean_accuracy"] = accuracy(model, test, batch_size)
        if triggered is not None and len(triggered):
            out["attack_success_rate"] = accuracy(model, triggered, batch_size)
        return out

    return evaluate


def apply_defense(defense: Defense, model: nn.Module, *, clean: ImageSet | None, data: ImageSet | None = None,
                  test_inputs: torch.Tensor | None = None, triggered_inputs: torch.Tensor | None = None,
                  reference: Callable[[int], nn.Module] | nn.Module | None = None,
                  inspection: InspectionResult | None = None, evaluate: Evaluate | None = None) -> Applied:
    """Run ``defense`` through its family's verb with what its contract allows. ``data`` is the
    training set (cleansers, robust trainers), without ground truth; ``model`` is, for a robust
    trainer, the freshly initialised model to train. ``reference`` is a model or a function from a
    seed to a clean reference model (trained only when the defense asks for one)."""
    fam = defense.family
    if data is not None and hasattr(data, "without_ground_truth"):
        data = data.without_ground_truth()
    t0 = time.perf_counter()
    detection: dict[str, Any] = {}
    if fam == "inspector":
        ref = None
        seed = defense.wants_reference()
        if seed is not None and reference is not None:
            ref = reference(seed) if callable(reference) and not isinstance(reference, nn.Module) else reference
        result = defense.inspect(model, _need(clean, defense, "clean"), reference=ref)
    elif fam == "cleanser":
        result = defense.cleanse(model, _need(data, defense, "data"), clean=clean, inspection=inspection)
    elif fam == "detector":
        defense.fit(model, _need(clean, defense, "clean"))
        result = None
        if test_inputs is not None:
            detection["clean"] = result = defense.detect(test_inputs)
        if triggered_inputs is not None:
            detection["triggered"] = defense.detect(triggered_inputs)
            result = result or detection["triggered"]
    elif fam == "repairer":
        result = defense.repair(model, _need(clean, defense, "clean"), evaluate=evaluate)
    elif fam == "robust-trainer":
        result = defense.train(model, _need(data, defense, "data"), clean=clean, evaluate=evaluate)
    else:
        raise BackdoorLabError(f"defense {defense.describe()} has an unknown family {fam!r}; "
                               "derive it from one of the five family classes in backdoorlab.defenses.base")
    return Applied(defense, result, time.perf_counter() - t0, detection)


def _need(value: Any, defense: Defense, what: str) -> Any:
    if value is None:
        raise BackdoorLabError(f"{defense.describe()} ({defense.family}) needs {what}; none was given")
    return value


def score(applied: Applied, truth: Truth, batch_size: int = 1024) -> dict[str, float]:
    """Every metric of ``applied`` that needs the truth, plus the method's own (:meth:`Defense.metrics`)."""
    from backdoorlab.train import predict

    d, res, fam = applied.defense, applied.result, applied.defense.family
    out: dict[str, float] = {}
    if fam == "inspector":
        out["backdoored"] = float(res.backdoored)
        out["max_anomaly"] = res.max_anomaly
        out["flagged_pairs"] = float(len(res.flagged_pairs))
        out["flagged_targets"] = float(len(res.flagged_targets))
        if truth.target is not None:
            out["target_found"] = float(truth.target in res.flagged_targets)
            if truth.mode == "source-specific" and truth.source is not None:
                out["pair_found"] = float((truth.source, truth.target) in res.flagged_pairs)
    elif fam == "cleanser":
        out["flagged"] = float(res.flagged.sum())
        if truth.is_poison is not None:
            t = truth.is_poison
            out.update(tpr=M.tpr(res.flagged, t), fpr=M.fpr(res.flagged, t), precision=M.precision(res.flagged, t),
                       auroc=M.auroc(res.scores, t))
            if truth.y_source is not None and bool(t.any()):
                out["label_accuracy"] = M.accuracy(res.corrected_labels[t], truth.y_source[t])
    elif fam == "detector":
        c, g = applied.detection.get("clean"), applied.detection.get("triggered")
        if c is not None:
            out["frr"] = M.frr(c.flagged)
        if g is not None:
            out["far"] = M.far(g.flagged)
        if c is not None and g is not None:
            s, t = detector_truth(c, g)
            out["auroc"] = M.auroc(s, t)
    elif fam in ("repairer", "robust-trainer"):
        new = res.model
        if truth.test is not None:
            out["clean_accuracy"] = M.clean_accuracy(predict(new, truth.test, batch_size), truth.test.y)
        if truth.triggered is not None and truth.asr_before is not None:
            out["attack_success_rate"] = M.attack_success_rate(predict(new, truth.triggered, batch_size), truth.triggered.y)
            if truth.ca_before is not None and "clean_accuracy" in out:
                out["der"] = M.defense_effectiveness_rating(truth.ca_before, out["clean_accuracy"], truth.asr_before,
                                                            out["attack_success_rate"])
        if fam == "robust-trainer":
            for phase, m in res.phases.items():  # e.g. CA / ASR after each ABL phase (from ``evaluate``)
                out.update({f"{phase}.{k}": float(v) for k, v in m.items()})
            if truth.is_poison is not None:
                out.update(isolation_scores(res, truth.is_poison))
    out.update({k: float(v) for k, v in d.metrics(res).items()})
    out["seconds"] = applied.seconds
    return out


def isolation_scores(res: Any, is_poison: torch.Tensor) -> dict[str, float]:
    """Isolation precision of a robust trainer's isolated samples, and the poison recall of its
    ranking's top 5 / 10 / 20% (where the poison not isolated sits)."""
    out: dict[str, float] = {}
    idx = res.isolated_indices
    if idx.numel():
        out["isolation_precision"] = float(is_poison[idx].float().mean())
        out["isolated_poison"] = float(is_poison[idx].sum())
    s = res.sample_scores
    if s is not None and s.numel() == is_poison.numel() and bool(is_poison.any()):
        order = torch.argsort(s, descending=True, stable=True)
        n = is_poison.numel()
        for q in (0.05, 0.1, 0.2):
            out[f"poison_recall_top_{q:g}"] = float(is_poison[order[:int(round(q * n))]].sum()) / float(is_poison.sum())
    return out


def detector_truth(clean: Any, triggered: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of a detector's clean and triggered passes, and the truth (True = triggered)."""
    s = torch.cat([clean.scores, triggered.scores])
    t = torch.cat([torch.zeros(len(clean.scores), dtype=torch.bool), torch.ones(len(triggered.scores), dtype=torch.bool)])
    return s, t


def figures(applied: Applied, truth: Truth) -> dict[str, bytes]:
    """The defense's own figures (:meth:`Defense.figures`), given the truth to colour them."""
    d, fam = applied.defense, applied.defense.family
    if fam == "detector":
        c, g = applied.detection.get("clean"), applied.detection.get("triggered")
        if c is None or g is None:
            return {}
        from backdoorlab.defenses.base import DetectionResult

        s, t = detector_truth(c, g)
        return d.figures(DetectionResult(s, torch.cat([c.flagged, g.flagged]), c.threshold), t)
    return d.figures(applied.result, truth.is_poison if fam in ("cleanser", "robust-trainer") else None)
