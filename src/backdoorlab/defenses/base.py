"""The five defense families, each with one small typed result, and the :data:`DEFENSES` registry.

| family | verb | result |
|---|---|---|
| :class:`Inspector` (model-level) | ``inspect(model, clean)`` | :class:`InspectionResult` |
| :class:`Cleanser` (data set) | ``cleanse(model, data)`` | :class:`CleanseResult` |
| :class:`InputDetector` (run time) | ``fit(model, clean)``, ``score(x)``, ``detect(x)`` | :class:`DetectionResult` |
| :class:`Repairer` (model) | ``repair(model, clean)`` | :class:`RepairResult` |
| :class:`RobustTrainer` | ``train(model, poisoned)`` | :class:`RobustTrainResult` |

Defenses see only what their threat model allows: the model, a small clean set, the (possibly
poisoned) training set *without* ``is_poison``. Callers score them with the ground truth afterwards.
Defense classes are frozen (pydantic) dataclasses of their parameters, registered by name with
``@DEFENSES.register(name)``; each declares its ``family``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from backdoorlab.registry import Registry
from backdoorlab.types import ImageSet

FAMILIES = ("inspector", "cleanser", "detector", "repairer", "robust-trainer")


class Defense:
    family: ClassVar[str] = ""

    def describe(self) -> str:
        return type(self).__name__


DEFENSES: Registry[Defense] = Registry("defense")


# ------------------------------------------------------------------ results (immutable)
@dataclass(frozen=True, eq=False)
class InspectionResult:
    """Model-level verdict. ``scores`` (K, K) per (source, target) statistic (NaN on the diagonal)
    or (K,) per target; ``anomaly`` the MAD anomaly index of each entry (positive = suspicious)."""

    backdoored: bool
    flagged_pairs: list[tuple[int, int]]
    flagged_targets: list[int]
    scores: torch.Tensor
    anomaly: torch.Tensor
    patterns: torch.Tensor | None = None  # e.g. (K, K, C, H, W) estimated triggers
    details: dict[str, Any] = field(default_factory=dict)

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
    """A model trained robustly on possibly poisoned data, with what the method isolated."""

    model: nn.Module
    isolated_indices: torch.Tensor
    details: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ families
class Inspector(Defense):
    family: ClassVar[str] = "inspector"

    def inspect(self, model: nn.Module, clean: ImageSet) -> InspectionResult:  # pragma: no cover
        raise NotImplementedError


class Cleanser(Defense):
    family: ClassVar[str] = "cleanser"

    def cleanse(self, model: nn.Module, data: ImageSet, clean: ImageSet | None = None) -> CleanseResult:  # pragma: no cover
        raise NotImplementedError


class InputDetector(Defense):
    family: ClassVar[str] = "detector"

    def fit(self, model: nn.Module, clean: ImageSet) -> "InputDetector":  # pragma: no cover
        raise NotImplementedError

    def score(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def detect(self, x: torch.Tensor) -> DetectionResult:  # pragma: no cover
        raise NotImplementedError


class Repairer(Defense):
    family: ClassVar[str] = "repairer"

    def repair(self, model: nn.Module, clean: ImageSet) -> RepairResult:  # pragma: no cover
        raise NotImplementedError


class RobustTrainer(Defense):
    family: ClassVar[str] = "robust-trainer"

    def train(self, model: nn.Module, data: ImageSet) -> RobustTrainResult:  # pragma: no cover
        raise NotImplementedError


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
