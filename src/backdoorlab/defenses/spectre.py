"""Cleanser ``spectre``: robust whitening of each class's representations, then QUantum Entropy scores.

Paper: J. Hayase, W. Kong, R. Somani, S. Oh, "SPECTRE: Defending Against Backdoor Attacks Using
Robust Statistics", ICML 2021 (arXiv:2104.11315); QUE scoring from Y. Dong, S. B. Hopkins, J. Li,
"Quantum Entropy Scoring for Fast Robust Mean Estimation and Improved Outlier Detection", NeurIPS 2019.

For each class (the samples' labels), the penultimate activations of the model trained on the
(poisoned) training set are projected on their top ``dims`` principal directions; a robust mean
and covariance of the class are estimated, the class is whitened with them, z = S^(-1/2)(r - mu),
and each sample gets the QUE score z' Q z / tr(Q), Q = exp(alpha (C - I) / (||C|| - 1)), C the
covariance of the whitened class, alpha = 4 (the paper's). After robust whitening the clean samples
are isotropic and the poison's direction carries the excess variance, which Q weights
exponentially. ``flag="quota"`` flags the ``ceil(1.5 * poison_share * n_c)`` highest scores of every
class, as the paper removes 1.5 epsilon; ``threshold`` flags scores above a fixed value instead.

Deviations, and why:
- Robust estimation: iterated trimming (concentration steps, as in the minimum covariance
  determinant): estimate mean and covariance on the kept samples, keep the ``1 - 1.5 epsilon``
  share with the smallest Mahalanobis distances, repeat until the kept set is stable (at most
  ``robust_iterations``). The paper uses the filter of Diakonikolas et al.; both need the poison to
  be a minority of the class.
- ``reference="clean"`` (``"auto"`` with a clean set) estimates the mean and covariance from the
  defender's clean images of the class instead. Under an all-to-one attack at 10% the target class
  is about half poison, beyond what any robust estimator of the class alone can undo.
  ``reference="data"`` is the paper's.
- ``flag="clean"`` (``"auto"`` with ``reference="clean"``): the clean images of each class are split
  in two alternate halves; one half gives the mean and covariance, the other is scored like the
  training samples, and the threshold is the ``1 - clean_fpr`` quantile of those held-out clean
  scores (pooled over the classes). The paper's quota flags 1.5 epsilon of every class, clean
  classes included (a false-positive rate near 1.5 epsilon by construction).
- ``dims`` is fixed (default 32) rather than chosen per run; a small ridge (1e-3 of the mean
  variance) keeps the covariance invertible.

Measurements: docs/cleansers.md.
"""

from __future__ import annotations

import logging
import math
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


def _mean_cov(x: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    mu = x.mean(0)
    xc = x - mu
    cov = xc.T @ xc / max(1, x.shape[0] - 1)
    eps = ridge * float(torch.diagonal(cov).mean().clamp_min(1e-12))
    return mu, cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype)


def _inv_sqrt(cov: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(cov)
    return v @ torch.diag(w.clamp_min(1e-12).rsqrt()) @ v.T


def robust_mean_cov(x: torch.Tensor, keep: float, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the ``keep`` share of ``x`` (n, d) closest in Mahalanobis distance (iterated)."""
    m = max(x.shape[1] + 1, int(math.ceil(keep * x.shape[0])))
    sel = torch.arange(x.shape[0])
    for _ in range(iterations):
        mu, cov = _mean_cov(x[sel])
        d = ((x - mu) @ _inv_sqrt(cov)).pow(2).sum(1)
        new = torch.topk(d, min(m, x.shape[0]), largest=False).indices.sort().values
        if new.numel() == sel.numel() and bool((new == sel).all()):
            break
        sel = new
    return _mean_cov(x[sel])


def que_matrix(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """QUE's Q = exp(alpha (C - I) / (||C|| - 1)) / tr(...) for whitened samples ``z`` (n, d), C their
    second moment; a sample's score is z' Q z."""
    c = z.T @ z / z.shape[0]
    w, v = torch.linalg.eigh(c)
    top = float(w.max())
    denom = top - 1.0 if top - 1.0 > 1e-6 else 1.0
    ew = torch.exp((alpha * (w - 1.0) / denom).clamp(max=80.0))
    return v @ torch.diag(ew / ew.sum()) @ v.T


@DEFENSES.register("spectre", "SPECTRE (Hayase et al. 2021): robust covariance whitening of each class's representations, QUE outlier scores; flags 1.5 x the expected poison share")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Spectre(Cleanser):
    poison_share: float = Field(0.1, gt=0, lt=0.67, description="expected (upper bound of the) poisoned share epsilon; "
                                "1.5 x epsilon of every class is flagged, and trimmed by the robust estimate")
    threshold: Optional[float] = Field(None, gt=0, description="flag QUE scores above this (overrides flag)")
    flag: Literal["auto", "quota", "clean"] = Field(
        "auto", description="quota: 1.5 epsilon of every class (the paper); clean: above the 1 - clean_fpr quantile of "
        "held-out clean scores (needs reference=clean); auto: clean with reference=clean, else quota")
    clean_fpr: float = Field(0.01, gt=0, lt=0.5, description="flag=clean: the share of held-out clean scores above the threshold")
    dims: int = Field(32, ge=1, le=4096, description="principal directions kept per class")
    alpha: float = Field(4.0, gt=0, description="QUE's alpha (the paper: 4)")
    reference: Literal["auto", "data", "clean"] = Field(
        "auto", description="robust statistics from the class itself (the paper), from its clean images, or auto (clean when given)")
    robust_iterations: int = Field(20, ge=1)
    segment: Literal["label", "prediction"] = "label"
    batch_size: int = Field(512, ge=1)
    seed: int = Field(0, ge=0)

    def summary(self, result: CleanseResult) -> dict:
        return {"poison_share": self.poison_share, "reference": result.details.get("reference"), "dims": self.dims,
                "alpha": self.alpha, "flag": result.details.get("flag"), "threshold": result.threshold}

    def cleanse(self, model: nn.Module, data: ImageSet, *, clean: ImageSet | None = None,
                inspection: InspectionResult | None = None) -> CleanseResult:
        feats, seg, cf, cy = segmented_features(model, data, clean, segment=self.segment, batch_size=self.batch_size)
        ref = self.reference if self.reference != "auto" else ("clean" if cf is not None else "data")
        if ref == "clean" and cf is None:
            raise BackdoorLabError("SPECTRE with reference=clean needs a clean set; give one (--clean) or use reference=data")
        rule = self.flag if self.flag != "auto" else ("clean" if ref == "clean" else "quota")
        if rule == "clean" and ref != "clean":
            raise BackdoorLabError("SPECTRE with flag=clean needs reference=clean (and a clean set)")
        groups = class_groups(seg, data.num_classes)
        scores = torch.zeros(len(data), dtype=torch.float64)
        held: list[torch.Tensor] = []
        for c, idx in enumerate(groups):
            if idx.numel() < 3:
                continue
            r = feats[idx].double()
            mean = r.mean(0)
            k = max(1, min(self.dims, r.shape[1], idx.numel() - 1))
            basis = torch.linalg.svd(r - mean, full_matrices=False).Vh[:k].T  # (D, k)
            x = (r - mean) @ basis
            if ref == "clean":
                own = torch.nonzero(cy == c).flatten()
                if own.numel() < 4:
                    raise BackdoorLabError(f"SPECTRE: the clean set has fewer than 4 images of class {c}; give a larger "
                                           "clean set or reference=data")
                xc = (cf[own].double() - mean) @ basis
                fit, test = (xc[0::2], xc[1::2]) if rule == "clean" else (xc, xc[:0])
                mu, cov = _mean_cov(fit)
            else:
                mu, cov = robust_mean_cov(x, 1.0 - 1.5 * self.poison_share, self.robust_iterations)
            w = _inv_sqrt(cov)
            z = (x - mu) @ w
            q = que_matrix(z, self.alpha)
            scores[idx] = ((z @ q) * z).sum(1)
            if rule == "clean" and ref == "clean" and test.numel():
                zt = (test - mu) @ w
                held.append(((zt @ q) * zt).sum(1))
        if rule == "clean" and self.threshold is None:
            thr = float(torch.quantile(torch.cat(held), 1.0 - self.clean_fpr)) if held else float("inf")
            flagged = scores > thr
        else:
            flagged, thr = quota_flags(scores, groups, 1.5 * self.poison_share, self.threshold)
        log.info("SPECTRE (reference %s): %d of %d samples flagged", ref, int(flagged.sum()), len(data))
        return CleanseResult(scores.float(), flagged, data.y.clone(), thr, {"reference": ref, "flag": rule if self.threshold is None else "threshold"})
