"""Cleanser ``spectral-signatures``: outliers along the top singular vector of each class's representations.

Paper: B. Tran, J. Li, A. Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018
(arXiv:1811.00636), Algorithm 1.

For each class (the samples' labels), the penultimate activations R of the model trained on the
(poisoned) training set are centred, M = R - mean(R); v is the top right singular vector of M and
each sample's score is its squared projection (M_i . v)^2. The ``ceil(1.5 * poison_share * n_c)``
highest-scoring samples of every class are flagged (the paper removes 1.5 epsilon, epsilon an upper
bound on the poisoned share). ``threshold`` flags scores above a fixed value instead.

Scores are divided by the mean score of their class (the variance along v), so that the scores of
different classes compare (for AUROC and ranking); the per-class flags do not depend on it.

Deviations, and why:
- ``centre="clean"`` (``"auto"`` with a clean set) centres each class at the mean activation of the
  defender's clean images of that class instead of the class's own mean. Under an all-to-one attack
  at 10%, the target class is about half poison: its mean falls between the two groups, both
  project equally far from it, and the paper's score cannot tell them apart. Centred at the clean
  mean, v points from the clean class to the poison and the poison scores high. ``centre="class"``
  is the paper's.

Measurements: docs/cleansers.md.
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from backdoorlab.defenses._features import class_groups, quota_flags, segmented_features
from backdoorlab.defenses.base import DEFENSES, CleanseResult, Cleanser, InspectionResult
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

log = logging.getLogger(__name__)


def class_centres(feats: torch.Tensor, groups: list[torch.Tensor], centre: str, cf: torch.Tensor | None,
                  cy: torch.Tensor | None, what: str) -> list[torch.Tensor | None]:
    """The centre of each class: its own mean (``class``) or the mean of its clean images (``clean``)."""
    out: list[torch.Tensor | None] = []
    for c, idx in enumerate(groups):
        if idx.numel() == 0:
            out.append(None)
        elif centre == "class":
            out.append(feats[idx].double().mean(0))
        else:
            ref = cy == c
            if not bool(ref.any()):
                raise BackdoorLabError(f"{what}: the clean set has no image of class {c}; give a clean set with every "
                                       "class or centre=class")
            out.append(cf[ref].double().mean(0))
    return out


@DEFENSES.register("spectral-signatures", "spectral signatures (Tran et al. 2018): per class, squared projection on the top singular vector of the centred representations; flags 1.5 x the expected poison share")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SpectralSignatures(Cleanser):
    poison_share: float = Field(0.1, gt=0, lt=0.67, description="expected (upper bound of the) poisoned share epsilon; "
                                "1.5 x epsilon of every class is flagged")
    threshold: Optional[float] = Field(None, gt=0, description="flag normalised scores above this instead of the 1.5 epsilon quota")
    centre: Literal["auto", "class", "clean"] = Field(
        "auto", description="centre each class at its own mean (the paper), at its clean images' mean, or auto (clean when given)")
    segment: Literal["label", "prediction"] = "label"
    batch_size: int = Field(512, ge=1)
    seed: int = Field(0, ge=0)

    def summary(self, result: CleanseResult) -> dict:
        return {"poison_share": self.poison_share, "centre": result.details.get("centre"),
                "threshold": None if self.threshold is None else self.threshold}

    def cleanse(self, model: nn.Module, data: ImageSet, *, clean: ImageSet | None = None,
                inspection: InspectionResult | None = None) -> CleanseResult:
        feats, seg, cf, cy = segmented_features(model, data, clean, segment=self.segment, batch_size=self.batch_size)
        centre = self.centre if self.centre != "auto" else ("clean" if cf is not None else "class")
        if centre == "clean" and cf is None:
            raise BackdoorLabError("spectral signatures with centre=clean needs a clean set; give one (--clean) or use centre=class")
        groups = class_groups(seg, data.num_classes)
        scores = torch.zeros(len(data), dtype=torch.float64)
        for idx, mu in zip(groups, class_centres(feats, groups, centre, cf, cy, "spectral signatures")):
            if idx.numel() < 2:
                continue
            m = feats[idx].double() - mu
            v = torch.linalg.svd(m, full_matrices=False).Vh[0]
            s = (m @ v) ** 2
            scores[idx] = s / s.mean().clamp_min(1e-12)
        flagged, thr = quota_flags(scores, groups, 1.5 * self.poison_share, self.threshold)
        log.info("spectral signatures (centre %s): %d of %d samples flagged", centre, int(flagged.sum()), len(data))
        return CleanseResult(scores.float(), flagged, data.y.clone(), thr, {"centre": centre})
