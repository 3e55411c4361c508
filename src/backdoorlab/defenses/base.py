"""The five defense families: what each may receive, what it returns, and its report hooks.

| family | verb | result |
|---|---|---|
| :class:`Inspector` (model level) | ``inspect(model, clean, *, reference=None)`` | :class:`InspectionResult` |
| :class:`Cleanser` (training set) | ``cleanse(model, data, *, clean=None, inspection=None)`` | :class:`CleanseResult` |
| :class:`InputDetector` (run time) | ``fit(model, clean)``, ``score(x)``, ``detect(x)`` | :class:`DetectionResult` |
| :class:`Repairer` (model) | ``repair(model, clean, *, evaluate=None)`` | :class:`RepairResult` |
| :class:`RobustTrainer` | ``train(model, data, *, clean=None, evaluate=None)`` | :class:`RobustTrainResult` |

What a defense may receive is exactly these arguments, and never the ground truth:
- ``model``: the suspect (a robust trainer gets a freshly initialised model of the architecture);
- ``clean``: the defender's small clean set; ``data``: the (possibly poisoned) training set without
  ``is_poison``;
- ``reference``: a clean reference model of the same task, for inspectors that compare with one
  (they say so with :meth:`Defense.wants_reference`, and the runner trains it);
- ``inspection``: the result of the inspector a cleanser builds on (:meth:`Cleanser.inspector`),
  when the runner has already run an equal one on the same model;
- ``evaluate``: a callback ``evaluate(model) -> {"clean_accuracy": .., "attack_success_rate": ..}``
  that lets a repairer or trainer report a curve. It hides the evaluation data; its figures must
  never steer the defense.

The runner (:mod:`backdoorlab.evaluation`) scores every result with the truth afterwards: TPR / FPR of
flagged samples, isolation precision, FRR / FAR, target found, CA / ASR / DER. Each defense adds
its own report rows and figures through two hooks, :meth:`Defense.metrics` and
:meth:`Defense.figures`, and its summary for the CLI and the API through :meth:`Defense.summary`;
nobody else reads a method's ``details``.

Defense classes are frozen (pydantic) dataclasses of their parameters, registered by name with
``@DEFENSES.register(name)``; each declares its ``family`` by its base class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from backdoorlab.registry import Registry
from backdoorlab.types import ImageSet

FAMILIES = ("inspector", "cleanser", "detector", "repairer", "robust-trainer")

Evaluate = Callable[[nn.Module], dict]
"""``evaluate(model) -> {"clean_accuracy": float, "attack_success_rate": float}`` (keys as available)."""


# ------------------------------------------------------------------ results (immutable)
@dataclass(frozen=True, eq=False)
class InspectionResult:
    """Model-level verdict. ``scores`` (K, K) per (source, target) statistic (NaN on the diagonal)
    or (K,) per target; ``anomaly`` the anomaly index of each entry (positive = suspicious);
    ``threshold`` the index above which an entry is flagged and ``threshold_source`` where that
    threshold came from (e.g. "MAD rule", "calibrated on 8 clean models")."""

    backdoored: bool
    flagged_pairs: list[tuple[int, int]]
    flagged_targets: list[int]
    scores: torch.Tensor
    anomaly: torch.Tensor
    patterns: torch.Tensor | None = None  # e.g. (K, K, C, H, W) estimated triggers
    threshold: float = float("nan")
    threshold_source: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # the method's own; read only by its hooks

    @property
    def max_anomaly(self) -> float:
        a = self.anomaly[torch.isfinite(self.anomaly)]
        return float(a.max()) if a.numel() else float("nan")


@dataclass(frozen=True, eq=False)
class CleanseResult:
    """Per training sample: suspicion ``scores`` (N,), ``flagged`` (N,) bool, ``corrected_labels`` (N,)."""

    scores: torch.Tensor
    flagged: torch.Tensor
    corrected_labels: torch.Tensor
    threshold: float
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class DetectionResult:
    """Per input: ``scores`` (N,) (higher = more suspicious), ``flagged`` (N,) bool, the threshold used."""

    scores: torch.Tensor
    flagged: torch.Tensor
    threshold: float


@dataclass(frozen=True, eq=False)
class RepairResult:
    """The repaired model and a curve (one dict per step, e.g. pruned fraction, CA, ASR)."""

    model: nn.Module
    curve: list[dict[str, float]]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class RobustTrainResult:
    """A model trained robustly on possibly poisoned data, with what the method isolated.
    ``sample_scores`` (N,) ranks the training samples (higher = more suspicious) when the method
    has such a ranking; ``loss_traces`` (epochs, N) per-sample losses when it records them."""

    model: nn.Module
    isolated_indices: torch.Tensor
    sample_scores: torch.Tensor | None = None
    loss_traces: torch.Tensor | None = None
    phases: dict[str, dict[str, float]] = field(default_factory=dict)  # per-phase figures, e.g. from evaluate
    details: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ families
class Defense:
    """Base of every defense. Subclasses pick a family below and implement its verb."""

    family: ClassVar[str] = ""
    report_keys: ClassVar[tuple[str, ...]] = ()  # method-specific metrics (from :meth:`metrics`) for report tables

    def describe(self) -> str:
        return type(self).__name__

    def wants_reference(self) -> int | None:
        """The seed of a clean reference model the runner should train and pass (None: no reference)."""
        return None

    # ---- hooks: called by the runner / API after the verb, never with the ground truth except in figures
    def metrics(self, result: Any) -> dict[str, float]:
        """Method-specific numbers for the run's metrics and the report (keys in :attr:`report_keys`)."""
        return {}

    def figures(self, result: Any, truth: torch.Tensor | None = None) -> dict[str, bytes]:
        """PNG figures of a result, by stem name. ``truth`` (per sample or input, when the runner
        knows it) may only colour a figure."""
        return {}

    def summary(self, result: Any) -> dict[str, Any]:
        """A JSON-ready summary of the result, for ``--json`` and the API's report folder."""
        return {}


DEFENSES: Registry[Defense] = Registry("defense")


class Inspector(Defense):
    family: ClassVar[str] = "inspector"

    def inspect(self, model: nn.Module, clean: ImageSet, *, reference: nn.Module | None = None) -> InspectionResult:  # pragma: no cover
        raise NotImplementedError


class Cleanser(Defense):
    family: ClassVar[str] = "cleanser"

    def inspector(self) -> "Inspector | None":
        """The inspector this cleanser runs itself when it gets no ``inspection``. A runner that has
        just run an equal inspector on the same model passes its result instead (same result, once)."""
        return None

    def cleanse(self, model: nn.Module, data: ImageSet, *, clean: ImageSet | None = None,
                inspection: InspectionResult | None = None) -> CleanseResult:  # pragma: no cover
        raise NotImplementedError

    def figures(self, result: CleanseResult, truth: torch.Tensor | None = None) -> dict[str, bytes]:
        from backdoorlab.plots import score_histogram

        if truth is None or result.scores.numel() == 0:
            return {}
        return {"scores": score_histogram(result.scores, result.threshold, truth)}


class InputDetector(Defense):
    family: ClassVar[str] = "detector"

    def fit(self, model: nn.Module, clean: ImageSet) -> "InputDetector":  # pragma: no cover
        raise NotImplementedError

    def score(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def detect(self, x: torch.Tensor) -> DetectionResult:  # pragma: no cover
        raise NotImplementedError

    def figures(self, result: DetectionResult, truth: torch.Tensor | None = None) -> dict[str, bytes]:
        """``result`` holds clean and triggered inputs together; ``truth`` True = triggered."""
        from backdoorlab.plots import score_histogram

        if truth is None or result.scores.numel() == 0:
            return {}
        return {"scores": score_histogram(result.scores, result.threshold, truth, xlabel="detector score")}


class Repairer(Defense):
    family: ClassVar[str] = "repairer"

    def repair(self, model: nn.Module, clean: ImageSet, *, evaluate: Evaluate | None = None) -> RepairResult:  # pragma: no cover
        raise NotImplementedError


class RobustTrainer(Defense):
    family: ClassVar[str] = "robust-trainer"

    def train(self, model: nn.Module, data: ImageSet, *, clean: ImageSet | None = None,
              evaluate: Evaluate | None = None) -> RobustTrainResult:  # pragma: no cover
        raise NotImplementedError


def family_of(defense_or_class: Any) -> str:
    """The family of a defense (instance or class); '' when it is none of the five."""
    return getattr(defense_or_class, "family", "") or ""


# ------------------------------------------------------------------ shared statistics
MAD_CONSISTENCY = 1.4826


def mad_anomaly_index(values: torch.Tensor, min_scale: float = 0.0) -> torch.Tensor:
    """Anomaly index |v - median| / (1.4826 * MAD), signed (v - median), over the finite entries.

    The rule of Neural Cleanse (Wang et al. 2019) and Xiang, Miller & Kesidis: an entry whose
    index exceeds 2 on the suspicious side is an outlier. Non-finite entries stay NaN.
    ``min_scale`` floors 1.4826 * MAD (in the values' units): with few values (10 classes) the MAD
    is fragile, and a floor says how large a difference must be before it can count as an outlier.
    """
    v = values.double()
    ok = torch.isfinite(v)
    out = torch.full_like(v, float("nan"))
    if ok.sum() < 2:
        return out
    x = v[ok]
    med = x.median()
    mad = (x - med).abs().median() * MAD_CONSISTENCY
    mad = torch.clamp(mad, min=max(min_scale, 1e-12 + 1e-6 * float(x.abs().mean())))
    out[ok] = (x - med) / mad
    return out
