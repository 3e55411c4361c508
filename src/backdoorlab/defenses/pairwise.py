"""Pairwise trigger reverse-engineering: estimate a pattern for every (source, target) pair.

Papers: T. Ambadkar, "Detecting backdoor poisoning patterns and identifying poisoned samples"
(seed 000), after Z. Xiang, D. J. Miller, G. Kesidis, "Revealing Backdoors, Post-Training, in DNN
Classifiers via Novel Inference on Optimized Perturbations Inducing Group Misclassification"
(ICASSP 2020, the IPTRED statistic), with the MAD outlier rule of Neural Cleanse (Wang et al. 2019).

For each of the K(K-1) ordered pairs (s, t) we look for an additive pattern v_st such that the
clipped images [x + v] of class s go to t for a fraction rho >= pi of them (seed eq. 1), and
keep d(v) = ||v||_2 (or ||v||_1). Two statistics:

- ``min-norm`` (Xiang et al.; the principled one, default): the smallest perturbation that reaches
  rho >= pi. A planted trigger is a shortcut, so the attacked pair needs an anomalously *small*
  pattern; flagged when the MAD anomaly index on the low side exceeds ``threshold``.
- ``seed`` (seed 000 as written): maximise the mean target probability J_st (eq. 2) with SGD,
  lr 0.1, at most 15 steps, stopping at rho >= pi; the attacked pair's pattern grows furthest,
  so flagged on the high side. Kept for comparison (benchmarks/bench_inspect.py shows that it
  ranks a look-alike pair first on our CNN).

Deviations, and why (for speed and accuracy; benchmarks/bench_inspect.py measures them):
- All pairs optimise as ONE batch: v is (P, C, H, W) for the P active pairs, the source images are
  repeated across targets, one forward/backward per step, and the indicator rho is computed from
  the same forward pass as the loss (no second pass). Pairs that reach rho >= pi leave the batch.
- ``min-norm`` minimises CE(t) + lambda_p * d(v) per pair with Neural Cleanse's lambda schedule
  (not SGD on the mean probability, whose gradient vanishes on confident models) by a normalised
  proximal gradient step (``optimizer="prox"``, the default; ``"adam"`` is kept, see
  :meth:`_optimise`), keeps each pair's smallest pattern that reached pi, keeps only its k largest
  entries (k by a geometric bisection, to ``sparsify_tolerance`` relative precision) and shrinks it
  by bisection on its scale (``bisection_steps``, forward passes only) to the smallest multiple
  that still reaches pi. The pair statistic is the residual of log d(v) after removing its row
  (source) and column (target) medians, flagged above ``threshold`` 3 (not 2: clean models reach
  indices above 2).
- Parameters of the optimisation: ``steps`` (30) steps per restart, with a peak step size ``lr``
  (0.1) decayed by a cosine, for either optimiser. With ``prox`` (default) the gradient is divided
  by its largest entry, so ``lr`` is the largest per-pixel move of a step and ``prox_threshold``
  the initial soft threshold as a fraction of that move; with ``adam`` ``lr`` is Adam's learning
  rate and ``lam`` the initial penalty weight. The ``mask`` formulation always uses Adam with
  ``steps``, ``lr`` and ``lam``.
- Cheap where it is safe: the optimisation runs on ``opt_images`` (10) images per pair; the
  sparsification and the rescaling (forward passes only) use all the clean images of the source
  class (on a 10-image subset, where pi = 0.9 allows one miss, they kept too many pixels and lost
  planted pairs). Forward passes are chunked at ``chunk`` (128) images, where CPU throughput peaks;
  the reach checks of the bisections stop a pair as soon as its hits or misses settle the answer.
- Many classes: the scan costs K(K-1) x ``opt_images`` x ``steps`` image passes. Above ``budget``
  (130,000; 10 classes need 27,000) only a design of pairs is optimised: every target from m evenly
  spaced sources and every source toward m targets (43 classes: m = 10, 430 of 1,806 pairs, each at
  full quality). A per-target (all-to-one) backdoor keeps m sources in its column; a source-specific
  one is seen only when its pair is in the design (``budget: null`` scans every pair). Cutting
  steps or images per pair instead (every pair, 5 images x 10 steps) blurred the column medians
  more on a GTSRB population, and m = 7 was too few sources (docs/populations.md).
- The sparsification's ``sparsify_tolerance`` (0.25) and the rescaling's ``bisection_steps`` (4)
  are coarser than before (0.1, 6): ~30% fewer forward passes, and the MNIST population's
  calibration half ranked models better with them (AUROC 0.853 -> 0.867).
- Restarts: ``restarts`` independent runs, each with its own start and its own images; each pair
  keeps its smallest pattern. Which run is smaller is decided on ``select_images`` (10) further
  images, and only the chosen run is sparsified and rescaled on all images (``select_images=None``
  finishes every run on all images, ``restarts`` times the cost). One run from one random start
  can settle on a natural perturbation and miss the planted shortcut, as Adam often did; the
  proximal step finds it from nearly every start, so the default is 1.
- Channels-last: the model is put in channels_last memory format for the scan (``frozen``) and
  restored afterwards; a model loaded from safetensors is contiguous, and mixed formats are slower.
- ``precision="auto"`` runs the forward passes under bfloat16 autocast where the CPU has native
  bfloat16 (AVX512-BF16 / AMX). Patterns, losses and decisions stay float32; a pair at the edge of
  pi may flip.

Measurements: docs/pairwise-audit.md.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Literal, Optional

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from backdoorlab.defenses._pair_null import PairNull, residuals
from backdoorlab.defenses._trigger_search import _norm, _TriggerSearch
from backdoorlab.defenses.base import DEFENSES, InspectionResult, Inspector, mad_anomaly_index
from backdoorlab.defenses.common import check_model_matches, frozen, images_per_class, precision_context
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

log = logging.getLogger(__name__)


def mad_rule(norms: torch.Tensor, precision: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-norm statistic's within-model anomaly indices: (per pair (K, K), per target (K,)),
    positive when small.

    Two-way log model: a pair's size is its source's ease times its target's ease times its own
    factor; the residual of log d(v) after removing the row (source) and column (target) medians
    (:func:`._pair_null.residuals`) is what a planted shortcut makes anomalously small. Per target
    (all-to-one attacks make a whole column small): Neural Cleanse's rule on the column medians of the
    log sizes, its scale floored at 0.7 in log units, so that at target_threshold 2 a target must be
    about 4x easier than the median target: with 10 columns the MAD is fragile (clean MNIST model
    seed 102 in bench_inspect.py --clean-models 5: five column medians within 0.15 of each other,
    MAD 0.22, and the naturally easy targets 8 and 2, 3x easier than the median, came out at 5.6
    and 4.5). An all-to-one trigger makes its column 10x+ smaller. The pairs' scale is floored at
    ``precision``, the log-size resolution of the scan (``log(1 + 2^-bisection_steps)``): on a model
    whose pairs are all alike, the MAD of sizes that differ by one bisection step is zero."""
    res, colmed = residuals(norms)
    anomaly = -mad_anomaly_index(res.flatten(), min_scale=precision).view_as(res).float()
    return anomaly, -mad_anomaly_index(colmed, min_scale=0.7).float()


@DEFENSES.register("pairwise", "reverse-engineer an additive trigger for every (source, target) pair; flag outlier pairs (seed 000)")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class PairwiseTriggerInspector(_TriggerSearch, Inspector):
    images_per_class: int = Field(100, ge=1, description="clean images per source class")
    pi: float = Field(0.9, gt=0.0, le=1.0, description="group misclassification fraction to reach")
    statistic: Literal["min-norm", "seed"] = "min-norm"
    formulation: Literal["additive", "mask"] = Field(
        "additive", description="min-norm: Neural Cleanse mask+pattern per pair (mask L1), or an additive v (its norm)")
    norm: Literal["l2", "l1"] = "l1"
    steps: int = Field(30, ge=1, description="min-norm: optimisation steps per restart")
    lr: float = Field(0.1, gt=0.0, description="min-norm: peak step size (prox: largest per-pixel move; adam: its learning rate)")
    optimizer: Literal["prox", "adam"] = Field(
        "prox", description="min-norm: normalised proximal gradient (L1 as a soft threshold) or Adam on the penalised loss")
    prox_threshold: float = Field(0.05, gt=0.0, le=1.0, description="min-norm, prox: initial soft threshold, "
                                  "as a fraction of the step (pixels whose gradient stays below it go to zero)")
    lam: float = Field(1e-3, gt=0.0, description="min-norm, adam: initial weight of the norm penalty")
    sign: Literal["both", "positive", "negative"] = Field(
        "both", description="min-norm: allowed sign of v (positive: stamps that only brighten)")
    init_scale: float = Field(0.5, ge=0.0, le=1.0, description="min-norm: start from uniform noise in [0, init_scale]")
    opt_images: int = Field(10, ge=1, description="min-norm: images per pair used by the optimisation")
    budget: Optional[int] = Field(
        130_000, ge=1, description="min-norm: at most this many image passes (pairs x opt_images x steps) in the "
        "optimisation; above it each target is scanned from m evenly spaced sources only (each source toward m "
        "targets), m = budget // (K x opt_images x steps), at least 3. 10 classes: 27,000, every pair; "
        "43 classes: m = 10 (430 of 1,806 pairs). None: every pair")
    bisection_steps: int = Field(4, ge=0, description="min-norm: bisection steps on each pattern's scale (precision 2^-steps)")
    sparsify_tolerance: float = Field(0.25, ge=0.0, description="min-norm: relative precision of the number of kept entries")
    restarts: int = Field(1, ge=1, description="min-norm: independent runs (own start, own images); each pair keeps its smallest")
    select_images: Optional[int] = Field(
        10, ge=1, description="min-norm, restarts > 1: held-back images per pair on which each pair's best run is chosen "
        "before only that run is finished on all images (None: finish every run on all images)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="forward passes in bfloat16 autocast (auto: where the CPU has native bfloat16; ~1.6x faster)")
    seed_lr: float = Field(0.1, gt=0.0, description="seed statistic: SGD learning rate")
    seed_steps: int = Field(15, ge=1, description="seed statistic: step budget")
    threshold: float = Field(3.0, gt=0.0, description="MAD anomaly index above which a pair is flagged")
    target_threshold: float = Field(2.0, gt=0.0, description="MAD anomaly index above which a target is flagged")
    chunk: int = Field(128, ge=1, description="images per forward pass (CPU throughput peaks at small batches)")
    calibration: Optional[str] = Field(
        None, description="min-norm: a null fitted on clean models (`backdoorlab calibrate`): pairs and targets are "
        "scored against the same pair in clean models, with the thresholds fitted there (instead of the MAD rule)")
    seed: int = 0

    # ------------------------------------------------------------------ API
    def scan_settings(self) -> dict[str, Any]:
        """The settings a calibration (:mod:`._pair_null`) must share with the suspect's scan."""
        return {"pi": self.pi, "images_per_class": self.images_per_class, "norm": self.norm,
                "formulation": self.formulation, "steps": self.steps, "opt_images": self.opt_images,
                "budget": self.budget, "bisection_steps": self.bisection_steps,
                "sparsify_tolerance": self.sparsify_tolerance, "restarts": self.restarts}

    @property
    def resolution(self) -> float:
        """The log-size resolution of the rescaling's bisection, ``log(1 + 2^-bisection_steps)``."""
        return math.log1p(2.0 ** -self.bisection_steps)

    def scanned_pairs(self, k: int, statistic: str | None = None) -> list[tuple[int, int]]:
        """The (source, target) pairs a min-norm scan of ``k`` classes optimises within ``budget``: all
        K(K-1), or the m offsets j_i = 1 + floor(i (K-1) / m) of each source, (s, (s + j_i) mod K), so
        that every target has m sources and every source m targets (a deterministic design, the same
        for a calibration and a suspect of the same class count)."""
        every = [(s, t) for s in range(k) for t in range(k) if s != t]
        cost = self.opt_images * self.steps * (self.restarts if self.formulation == "additive" else 1)
        if (statistic or self.statistic) != "min-norm" or self.budget is None or len(every) * cost <= self.budget:
            return every
        m = max(3, min(k - 1, self.budget // (k * cost)))
        offsets = [1 + (i * (k - 1)) // m for i in range(m)]
        return [(s, (s + j) % k) for s in range(k) for j in offsets]

    def estimate(self, model: nn.Module, clean: ImageSet, statistic: str | None = None) -> dict:
        """Patterns (K, K, C, H, W), norms (K, K) (NaN diagonal), reached (K, K) for one statistic."""
        check_model_matches(model, clean)
        stat = statistic or self.statistic
        g = torch.Generator().manual_seed(self.seed)
        xs = images_per_class(clean, self.images_per_class, g)
        k = clean.num_classes
        pairs = self.scanned_pairs(k, stat)
        src = torch.tensor([s for s, _ in pairs])
        tgt = torch.tensor([t for _, t in pairs])
        t0 = time.perf_counter()
        with frozen(model), precision_context(model, self.precision):
            mask_norm = None
            if stat == "min-norm" and self.formulation == "mask":
                v, found, mask_norm = self._min_mask(model, xs, src, tgt)
            elif stat == "min-norm":
                v, found, _ = self._min_norm_restarts(model, xs, src, tgt)
            else:
                v, found = self._seed(model, xs, src, tgt)
        patterns = torch.zeros(k, k, *xs.shape[2:])
        patterns[src, tgt] = v
        norms = torch.full((k, k), float("nan"))
        norms[src, tgt] = mask_norm if mask_norm is not None else _norm(v, self.norm)
        reached = torch.zeros(k, k, dtype=torch.bool)
        reached[src, tgt] = found
        log.info("%s scan of %d of %d pairs x %d images: %.1f s", stat, len(pairs), k * (k - 1), xs.shape[1],
                 time.perf_counter() - t0)
        return {"patterns": patterns, "norms": norms, "reached": reached, "seconds": time.perf_counter() - t0}

    def inspect(self, model: nn.Module, clean: ImageSet, *, reference: nn.Module | None = None) -> InspectionResult:
        t0 = time.perf_counter()
        null = None
        if self.calibration is not None:  # refused before any work when it does not fit the suspect
            if self.statistic != "min-norm":
                raise BackdoorLabError("a calibration applies to the min-norm statistic; drop `statistic: seed`")
            null = PairNull.load(self.calibration)
            null.check(clean.num_classes, clean.shape, self.scan_settings())
        est = self.estimate(model, clean)
        if null is not None:
            return self._calibrated(est, null, time.perf_counter() - t0, note=null.architecture_note(model))
        norms = est["norms"]
        k = clean.num_classes
        target_anomaly = torch.full((k,), float("nan"))
        if self.statistic == "min-norm":
            anomaly, target_anomaly = mad_rule(norms, self.resolution)
        else:
            anomaly = mad_anomaly_index(norms.flatten()).view(k, k).float()
        flagged = [(int(s), int(t)) for s, t in torch.nonzero(anomaly > self.threshold).tolist()]
        if self.statistic == "min-norm":
            flagged = [(s, t) for s, t in flagged if bool(est["reached"][s, t])]
        flagged_targets = {t for _, t in flagged} | {
            int(t) for t in torch.nonzero(target_anomaly > self.target_threshold).flatten().tolist()}
        flagged.sort(key=lambda st: -float(anomaly[st]))
        a = anomaly.clone()
        a[~torch.isfinite(a)] = -float("inf")
        order = torch.argsort(a.flatten(), descending=True)[: min(10, k * (k - 1))]
        ranking = [(int(i) // k, int(i) % k, float(norms.flatten()[i]), float(anomaly.flatten()[i])) for i in order]
        return InspectionResult(
            backdoored=bool(flagged or flagged_targets), flagged_pairs=flagged, flagged_targets=sorted(flagged_targets),
            scores=norms, anomaly=anomaly, patterns=est["patterns"], threshold=self.threshold,
            threshold_source=f"MAD anomaly index > {self.threshold:g} (per pair), > {self.target_threshold:g} (per target)",
            details={"target_anomaly": target_anomaly, "target_threshold": self.target_threshold, "statistic": self.statistic, "norm": self.norm, "reached": est["reached"], "ranking": ranking,
                     "images_per_class": int(min(self.images_per_class, int(clean.class_counts().min()))),
                     "seconds": time.perf_counter() - t0},
        )

    def _calibrated(self, est: dict, null: PairNull, seconds: float, note: str = "") -> InspectionResult:
        """The verdict against a null of clean models (:mod:`._pair_null`). The anomaly of a pair is
        the larger of its pair z and its target's z, each in units of its calibrated threshold, so
        the threshold is 1."""
        norms, reached = est["norms"], est["reached"]
        pz, cz = null.zscores(norms, reached)
        k = norms.shape[0]
        anomaly = torch.maximum(torch.nan_to_num(pz / null.threshold, nan=-float("inf")),
                                (cz / null.target_threshold).expand(k, k)).float()
        anomaly.fill_diagonal_(float("nan"))
        flagged = [(int(s), int(t)) for s, t in torch.nonzero(torch.nan_to_num(pz, nan=-1.0) > null.threshold).tolist()]
        flagged.sort(key=lambda st: -float(pz[st]))
        targets = sorted({t for _, t in flagged} | {int(t) for t in torch.nonzero(cz > null.target_threshold).flatten().tolist()})
        order = torch.argsort(torch.nan_to_num(pz, nan=-float("inf")).flatten(), descending=True)[: min(10, k * (k - 1))]
        ranking = [(int(i) // k, int(i) % k, float(norms.flatten()[i]), float(pz.flatten()[i])) for i in order]
        return InspectionResult(
            backdoored=bool(flagged or targets), flagged_pairs=flagged, flagged_targets=targets, scores=norms,
            anomaly=anomaly, patterns=est["patterns"], threshold=1.0, threshold_source=null.describe() + note,
            details={"pair_z": pz.float(), "target_z": cz.float(), "pair_threshold": null.threshold,
                     "target_threshold": null.target_threshold, "statistic": "min-norm, calibrated", "norm": self.norm,
                     "reached": reached, "ranking": ranking, "seconds": seconds})

    # ---- report hooks
    def figures(self, result: InspectionResult, truth: torch.Tensor | None = None) -> dict[str, bytes]:
        from backdoorlab import plots

        if result.patterns is None or result.patterns.dim() != 5:
            return {}
        out = {"patterns": plots.pattern_grid(result.patterns, False, highlight=result.flagged_pairs),
               "patterns_normalised": plots.pattern_grid(result.patterns, True, highlight=result.flagged_pairs),
               "pair_norms": plots.pair_scatter(result.scores, result.flagged_pairs, ylabel=f"{self.norm} norm of v")}
        for s, t in result.flagged_pairs[:4]:
            out[f"pattern_{s}_to_{t}"] = plots.compare_images([result.patterns[s, t]], [f"estimated {s}->{t}"])
        return out

    def summary(self, result: InspectionResult) -> dict[str, Any]:
        d = result.details
        matrix = self._matrices(result)
        if "pair_z" in d:
            return {"statistic": d["statistic"], "norm": self.norm, "threshold_source": result.threshold_source,
                    "pair_threshold": d["pair_threshold"], "target_threshold": d["target_threshold"],
                    "target_z": [round(float(z), 3) for z in d["target_z"]],
                    "top_pairs": [{"source": s, "target": t, "norm": n, "pair_z": z} for s, t, n, z in d["ranking"][:5]],
                    **matrix}
        return {"statistic": self.statistic, "norm": self.norm, "anomaly_threshold": self.threshold,
                "target_threshold": self.target_threshold,
                "top_pairs": [{"source": s, "target": t, "norm": n, "anomaly_index": a}
                              for s, t, n, a in result.details.get("ranking", [])[:5]], **matrix}

    @staticmethod
    def _matrices(result: InspectionResult) -> dict[str, Any]:
        """Every pair's pattern norm (``pair_norms[source][target]``, None on the diagonal) and whether its
        pattern reached ``pi`` (``pair_reached``), for a user's own statistics over the whole scan."""
        out: dict[str, Any] = {}
        if isinstance(result.scores, torch.Tensor) and result.scores.dim() == 2:
            out["pair_norms"] = [[round(v, 5) if math.isfinite(v) else None for v in row] for row in result.scores.double().tolist()]
        reached = result.details.get("reached")
        if isinstance(reached, torch.Tensor):
            out["pair_reached"] = reached.bool().tolist()
        return out
