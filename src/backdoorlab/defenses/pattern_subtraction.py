"""Find poisoned training samples by subtracting the reverse-engineered trigger, and relabel them.

Paper: T. Ambadkar, "Detecting backdoor poisoning patterns and identifying poisoned samples"
(seed 000), sections 5.1-5.2 and 6.3.

- Technique 1: flag x when argmax f(x) != argmax f([x - v]).
- Technique 2: flag x when p(y^|x) - p(y^|[x - v]) > delta, y^ = argmax f(x). delta is chosen
  automatically from the two-cluster histogram of the differences (Otsu's threshold: the split
  that maximises the between-cluster variance), as the seed reads it off its figure 6; a fixed
  ``delta`` can be given instead.
- Label correction (``relabel``): ``"prediction"`` is the seed's rule, the label predicted on
  [x - v]. Its accuracy is capped by the victim's own accuracy on those images (never seen with
  their true label). ``"auto"`` (default) also uses what the inspector found: a flagged pair
  (s, t) says that the poison labelled t was made from images of s, so a sample flagged under
  target t gets the most probable class on [x - v] *among the sources of the flagged pairs with
  target t* (with one flagged pair, s itself). Where the per-target rule flags t (an all-to-one
  attack makes the whole column small: the poison may come from any class, and only some of its
  pairs may be flagged), the most probable class other than t is taken instead. ``"source"``
  always restricts to the flagged sources. The seed's figure is reported beside ours in
  benchmarks/bench_inspect.py.

Deviations, and why:
- v is the pattern of each pair the inspector flagged (run here with the pairwise inspector
  unless patterns are passed in); as in the seed's code, only its positive part clamp(v, 0, 1) is
  subtracted (the negative part erases the source digit; it is not part of any stamp).
- Amplitude and support: the inspector's pattern is the *smallest* perturbation that flips the
  source class, weaker than the stamp and with faint noise elsewhere; subtracting it leaves enough
  trigger behind. We keep its support (entries of at least ``support`` times its peak) and scale it
  to peak 1 (the "normalised pattern" of the seed's figure 3) before subtracting. ``support=0``
  with ``normalise=False`` is the seed's subtraction.
- Dilation: the smallest pattern that flips the pair often needs only part of the stamp;
  subtracting only that part leaves enough of the stamp for the backdoor to fire on some samples.
  The support is widened by ``dilate`` pixels (a max filter) before subtracting.
- Alignment: a CNN with pooling also answers to a trigger shifted by a pixel or two, and the
  estimated pattern often lands beside the true one, so subtracting it would miss the stamp.
  Before subtracting, the pattern is shifted by up to ``max_shift`` pixels to the offset that
  changes the prediction of the most target-labelled training samples (a search over at most
  ``search_samples`` of them).
- All-to-one attacks: the inspector may flag the target by its per-target rule (its whole column
  of patterns is small) while no single pair passes the pair threshold; the seed's procedure then
  has no pattern to subtract. For each such target the column's smallest pattern that reached pi
  is used as well (one all-to-one trigger serves every source; one pattern keeps the alignment
  search to one pass).
- Pairs that are not poisoning patterns: "removing the backdoor pattern will not affect the model
  decision if it is not present" (seed 000, 5.1). For a planted pair the confidence drops of the
  samples labelled t split into two tight clusters, ~0 (clean) and ~1 (poison), so Otsu's
  separability is near 1; a natural pair the inspector flagged by mistake lowers the confidence of
  every sample of t, and its separability is lower. Pairs under ``min_separation`` are skipped,
  with a warning.
- Global all-to-one triggers (a blend, a low-amplitude chessboard): the pairwise scan's L1 patterns
  are sparse, and subtracting one (or its support) leaves a global trigger in place: on the MNIST
  population every blend and chessboard model the audit found was cleansed with TPR 0. For each
  target flagged by the per-target rule, and when clean images are given, a *universal* pattern is
  estimated as well: the smallest L2 perturbation (from ``universal_eps``, by projected gradient)
  that sends ``universal_rate`` of the clean images of the other classes to t, as Neural Cleanse
  reverses one trigger per target (its additive, L2 form). A sample labelled t is flagged when its
  confidence drop under [x - v] exceeds the ``clean_quantile`` of the drops of the clean images of
  t (and ``min_drop``): calibrated on clean data, not Otsu's split of the suspect set (on the
  population the drops ranked poison first, AUROC 0.96-1.0, but Otsu's cut fell inside the poison's
  spread). Poisoned training samples are fitted with confidence near 1, so their drops are often
  small (< 0.1) yet above every clean one: a floor of 0.1 cost most of the blends' TPR on the
  calibration half (docs/populations.md), so the default has none. The universal pattern is kept
  only when it flags more than ``min_excess`` of the samples labelled t (a pattern that is not a
  trigger flags about as many as on the clean images, 1 - ``clean_quantile``). Its flags are
  added to the pairs'.
- Only samples whose label is the flagged pair's target are examined: a sample poisoned by an
  s -> t attack carries label t, so the others cannot be its poison, and examining them only adds
  false positives. ``all_samples=True`` examines every sample, as the seed does.

Measurements: docs/pairwise-audit.md.
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from backdoorlab.defenses.base import DEFENSES, CleanseResult, Cleanser, InspectionResult, Inspector
from backdoorlab.defenses.common import check_model_matches
from backdoorlab.errors import BackdoorLabError
from backdoorlab.train import predict_logits
from backdoorlab.types import ImageSet

log = logging.getLogger(__name__)


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of 1-D values: the cut maximising the between-class variance of a histogram."""
    v = values.double().flatten()
    if v.numel() < 2 or float(v.max() - v.min()) == 0.0:
        return float(v.max()) if v.numel() else 0.0
    lo, hi = float(v.min()), float(v.max())
    hist = torch.histc(v, bins=bins, min=lo, max=hi)
    centers = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centers = (centers[:-1] + centers[1:]) / 2
    w0 = torch.cumsum(hist, 0)
    w1 = hist.sum() - w0
    m0 = torch.cumsum(hist * centers, 0)
    mu0 = m0 / w0.clamp_min(1e-12)
    mu1 = (m0[-1] - m0) / w1.clamp_min(1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1
    i = int(torch.argmax(between))
    return float((centers[i] + centers[min(i + 1, bins - 1)]) / 2)


@DEFENSES.register("pattern-subtraction", "flag training samples whose prediction changes when the estimated trigger is subtracted; relabel them (seed 000)")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class PatternSubtraction(Cleanser):
    technique: Literal[1, 2] = 2
    delta: Optional[float] = Field(None, description="technique 2 threshold; None = Otsu on the histogram")
    all_samples: bool = False
    images_per_class: int = Field(100, ge=1, description="clean images per class for the pairwise inspector")
    normalise: bool = Field(True, description="scale the pattern to peak 1 before subtracting")
    support: float = Field(0.25, ge=0.0, lt=1.0, description="keep pattern entries >= support * peak")
    dilate: int = Field(1, ge=0, description="widen the pattern's support by this many pixels (max filter)")
    max_shift: int = Field(3, ge=0, description="align the pattern: try shifts up to this many pixels")
    min_separation: Optional[float] = Field(
        0.9, ge=0.0, le=1.0, description="skip a pair whose confidence drops do not split into two clusters "
        "(Otsu's separability below this): its pattern hurts clean samples too (None: keep every pair)")
    relabel: Literal["auto", "prediction", "source"] = Field(
        "auto", description="label correction: the prediction on [x - v] (the seed's), restricted to the flagged "
        "pairs' sources (source), or source unless the per-target rule flags the target (auto)")
    universal: bool = Field(True, description="for targets flagged by the per-target rule, also subtract a universal "
                            "L2 pattern (global triggers; needs clean images)")
    universal_eps: tuple[float, ...] = Field((1.0, 2.0, 3.0, 4.0, 6.0), description="L2 budgets tried in order")
    universal_rate: float = Field(0.9, gt=0.0, le=1.0, description="share of clean other-class images the pattern must send to t")
    universal_steps: int = Field(50, ge=1)
    universal_images: int = Field(30, ge=1, description="clean images per class for the universal pattern")
    clean_quantile: float = Field(0.95, gt=0.0, lt=1.0, description="threshold: this quantile of the clean images' drops")
    min_drop: float = Field(0.0, ge=0.0, le=1.0, description="universal pattern: a drop below this is never evidence "
                            "(a floor under the clean quantile)")
    min_excess: float = Field(0.15, ge=0.0, le=1.0, description="keep a universal pattern only if it flags more than this share")
    search_samples: int = Field(1000, ge=1)
    batch_size: int = Field(2048, ge=1)
    seed: int = 0

    def removal_pattern(self, v: torch.Tensor) -> torch.Tensor:
        """The positive part of ``v``, cut to its support, dilated and scaled to peak 1 (see the module doc)."""
        u = v.clamp(0, 1)
        peak = float(u.max())
        if peak <= 0:
            return u
        u = torch.where(u >= self.support * peak, u, torch.zeros_like(u))
        if self.dilate:
            u = F.max_pool2d(u[None], 2 * self.dilate + 1, 1, self.dilate)[0]
        return u / peak if self.normalise else u

    def align(self, model: nn.Module, data: ImageSet, v: torch.Tensor, t: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Shift ``v`` (C, H, W) to the offset that flips the most samples labelled ``t`` when subtracted."""
        if self.max_shift == 0:
            return v, (0, 0)
        idx = torch.nonzero(data.y == t).flatten()
        g = torch.Generator().manual_seed(self.seed)
        idx = idx[torch.randperm(idx.numel(), generator=g)[: self.search_samples]]
        x = data.float_batch(idx)
        base = predict_logits(model, x, self.batch_size).argmax(1)
        r = range(-self.max_shift, self.max_shift + 1)
        shifts = [(dy, dx) for dy in r for dx in r]
        best, best_flips = (0, 0), -1
        for dy, dx in shifts:
            u = _shift(v, dy, dx)
            flips = int((predict_logits(model, (x - u).clamp(0, 1), self.batch_size).argmax(1) != base).sum())
            if flips > best_flips or (flips == best_flips and abs(dy) + abs(dx) < abs(best[0]) + abs(best[1])):
                best, best_flips = (dy, dx), flips
        return _shift(v, *best), best

    def figures(self, result: CleanseResult, truth: torch.Tensor | None = None) -> dict[str, bytes]:
        from backdoorlab.plots import score_histogram

        if truth is not None:
            return super().figures(result, truth)
        examined = result.scores != 0
        if not bool(examined.any()):
            return {}
        return {"score_histogram": score_histogram(result.scores[examined], result.threshold,
                                                   xlabel="p(y|x) - p(y|[x - v])",
                                                   title="confidence drop when the estimated trigger is removed")}

    def summary(self, result: CleanseResult) -> dict:
        d = result.details
        return {"technique": self.technique, "relabel": self.relabel, "examined": int(d.get("examined", 0)),
                "pairs": [list(p) for p in d.get("pairs", [])]}

    def inspector(self) -> Inspector:
        from backdoorlab.defenses.pairwise import PairwiseTriggerInspector

        return PairwiseTriggerInspector(images_per_class=self.images_per_class, seed=self.seed)

    def cleanse(self, model: nn.Module, data: ImageSet, *, clean: ImageSet | None = None,
                inspection: InspectionResult | None = None) -> CleanseResult:
        """Score every sample of ``data``; ``clean`` feeds the inspector unless ``inspection`` is given."""
        check_model_matches(model, data)
        if inspection is None:
            if clean is None:
                raise BackdoorLabError("pattern subtraction needs a clean set (to estimate the triggers) or an inspection result")
            inspection = self.inspector().inspect(model, clean)
        n = len(data)
        scores = torch.zeros(n)
        changed = torch.zeros(n, dtype=torch.bool)
        corrected = data.y.clone()
        removed_pred = torch.full((n,), -1, dtype=torch.long)
        removed_prob = torch.zeros(n, data.num_classes)
        examined = torch.zeros(n, dtype=torch.bool)
        shifts: dict[tuple[int, int], tuple[int, int]] = {}
        pairs = self.pairs_to_examine(inspection)
        if inspection.patterns is None or not pairs:
            return CleanseResult(scores, torch.zeros(n, dtype=torch.bool), corrected, float("nan"),
                                 {"pairs": [], "examined": 0, "technique": self.technique})
        kept, separation = [], {}
        for s, t in pairs:
            v, shift = self.align(model, data, self.removal_pattern(inspection.patterns[s, t]), t)
            shifts[(s, t)] = shift
            idx = torch.arange(n) if self.all_samples else torch.nonzero(data.y == t).flatten()
            if idx.numel() == 0:
                continue
            diffs, preds, probs, yhats = [], [], [], []
            for b in range(0, idx.numel(), self.batch_size):
                d, p2, yhat = self._drops(model, data.float_batch(idx[b:b + self.batch_size]), v)
                diffs.append(d)
                preds.append(p2.argmax(1))
                probs.append(p2)
                yhats.append(yhat)
            diff, pred, prob, yhat = torch.cat(diffs), torch.cat(preds), torch.cat(probs), torch.cat(yhats)
            separation[(s, t)] = sep = otsu_separation(diff)
            if self.min_separation is not None and sep < self.min_separation:
                log.warning("pair (%d, %d): subtracting its pattern lowers the confidence of clean-looking and "
                            "suspicious samples alike (two-cluster separation %.2f < min_separation %.2f): "
                            "not treated as a poisoning pattern", s, t, sep, self.min_separation)
                continue
            kept.append((s, t))
            # keep the strongest evidence when several pairs examine the same sample
            sel = (diff > scores[idx]) | ~examined[idx]
            upd = idx[sel]
            scores[upd] = diff[sel]
            removed_pred[upd] = pred[sel]
            removed_prob[upd] = prob[sel]
            changed[upd] = (yhat != pred)[sel]
            examined[idx] = True
        if not examined.any():
            flagged = torch.zeros(n, dtype=torch.bool)
            thr = float("nan")
        elif self.technique == 1:
            flagged = changed & examined
            thr = float("nan")
        else:
            thr = self.delta if self.delta is not None else otsu_threshold(scores[examined])
            flagged = examined & (scores > thr)
        universal = {}
        if self.universal and clean is not None:
            for t in self.column_targets(inspection):
                got = self._universal(model, data, clean, t)
                if got is None:
                    continue
                idx, drop, pred, prob, cut, share = got
                universal[t] = {"threshold": cut, "flagged_share": share}
                if share <= self.min_excess:
                    log.info("target %d: the universal pattern flags %.1f%% of the samples labelled %d (<= min_excess): "
                             "not a trigger", t, 100 * share, t)
                    continue
                new = (drop > cut) & ~flagged[idx]
                upd = idx[new]
                scores[upd], removed_pred[upd], removed_prob[upd] = drop[new], pred[new], prob[new]
                changed[upd] = True
                flagged[upd] = True
                examined[idx] = True
        corrected[flagged] = self._relabel(removed_pred, removed_prob, data.y, flagged, inspection, kept)[flagged]
        log.info("pattern subtraction: %d of %d examined samples flagged", int(flagged.sum()), int(examined.sum()))
        return CleanseResult(scores, flagged, corrected, thr,
                             {"pairs": kept, "examined": int(examined.sum()), "rejected_pairs": [q for q in pairs if q not in kept],
                              "separation": separation,
                              "technique": self.technique, "changed_prediction": changed, "shifts": shifts,
                              "universal": universal,
                              "removed_prediction": removed_pred, "relabel": self.relabel})

    def _universal(self, model: nn.Module, data: ImageSet, clean: ImageSet, t: int):
        """Target t's universal L2 pattern (see the module doc) and what subtracting it does to the
        samples labelled t: (their indices, confidence drops, predictions and probabilities on
        [x - v], the clean threshold, the share flagged); None when t has no clean image."""
        from backdoorlab.defenses.common import images_per_class

        g = torch.Generator().manual_seed(self.seed)
        xs = images_per_class(clean, self.universal_images, g)  # (K, n, C, H, W)
        others = torch.cat([xs[k] for k in range(xs.shape[0]) if k != t])
        own = clean.float_batch(torch.nonzero(clean.y == t).flatten())
        idx = torch.nonzero(data.y == t).flatten()
        if own.shape[0] == 0 or idx.numel() == 0:
            return None
        v = self._universal_pattern(model, others, t)
        cut = max(float(self._drops(model, own, v, t)[0].quantile(self.clean_quantile)), self.min_drop)
        drops, preds, probs = [], [], []
        for b in range(0, idx.numel(), self.batch_size):
            d, p2, _ = self._drops(model, data.float_batch(idx[b:b + self.batch_size]), v, t)
            drops.append(d)
            preds.append(p2.argmax(1))
            probs.append(p2)
        drop = torch.cat(drops)
        return idx, drop, torch.cat(preds), torch.cat(probs), cut, float((drop > cut).float().mean())

    def _drops(self, model: nn.Module, x: torch.Tensor, v: torch.Tensor,
               t: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The confidence drop p(c | x) - p(c | [x - v]) of class c = t (or each image's predicted class
        when t is None), the probabilities on [x - v], and c."""
        p1 = F.softmax(predict_logits(model, x, self.batch_size), 1)
        p2 = F.softmax(predict_logits(model, (x - v).clamp(0, 1), self.batch_size), 1)
        c = p1.argmax(1) if t is None else torch.full((x.shape[0],), t, dtype=torch.long)
        return p1.gather(1, c[:, None]).squeeze(1) - p2.gather(1, c[:, None]).squeeze(1), p2, c

    def _universal_pattern(self, model: nn.Module, x: torch.Tensor, t: int) -> torch.Tensor:
        """The first budget of ``universal_eps`` whose projected-gradient pattern sends
        ``universal_rate`` of ``x`` to t (the last one's pattern when none does)."""
        from backdoorlab.defenses.common import frozen

        target = torch.full((x.shape[0],), t, dtype=torch.long)
        with frozen(model):
            for eps in self.universal_eps:
                v = torch.zeros_like(x[:1])
                for _ in range(self.universal_steps):
                    v.requires_grad_(True)
                    loss = F.cross_entropy(model((x + v).clamp(0, 1)), target)
                    (grad,) = torch.autograd.grad(loss, v)
                    with torch.no_grad():
                        v = v - eps / 10 * grad / grad.norm().clamp_min(1e-12)
                        v = v * min(1.0, eps / float(v.norm().clamp_min(1e-12)))
                with torch.no_grad():
                    rate = float((model((x + v).clamp(0, 1)).argmax(1) == t).float().mean())
                if rate >= self.universal_rate:
                    break
        log.info("target %d: universal pattern of L2 norm %.2f sends %.0f%% of clean images to it", t, eps, 100 * rate)
        return v.detach()[0]

    @staticmethod
    def column_targets(inspection: InspectionResult) -> list[int]:
        """Targets flagged by the inspector's per-target (column) rule: all-to-one evidence."""
        d = inspection.details or {}
        ta, thr = d.get("target_anomaly"), d.get("target_threshold")
        if ta is None or thr is None:
            return []
        return [t for t in range(ta.numel()) if bool(torch.isfinite(ta[t])) and float(ta[t]) > float(thr)]

    def pairs_to_examine(self, inspection: InspectionResult) -> list[tuple[int, int]]:
        """The flagged pairs, plus, for each target flagged by the per-target rule (an all-to-one
        attack, where single pairs may stay under the pair threshold), the pair of that column with
        the smallest pattern that reached pi: one all-to-one trigger serves every source."""
        pairs = list(inspection.flagged_pairs)
        reached = (inspection.details or {}).get("reached")
        for t in self.column_targets(inspection):
            if any(tt == t for _, tt in pairs) or inspection.scores.dim() != 2:
                continue
            col = inspection.scores[:, t].clone()
            ok = torch.isfinite(col)
            if reached is not None:
                ok &= reached[:, t]
            ok[t] = False
            if ok.any():
                s = int(torch.where(ok, col, torch.full_like(col, float("inf"))).argmin())
                pairs.append((s, t))
        return pairs

    def _relabel(self, pred: torch.Tensor, prob: torch.Tensor, y: torch.Tensor, flagged: torch.Tensor,
                 inspection: InspectionResult, pairs: list[tuple[int, int]]) -> torch.Tensor:
        """Corrected labels (N,) for the ``relabel`` rule (see the module doc); only flagged entries matter."""
        if self.relabel == "prediction":
            return pred
        k = prob.shape[1]
        allowed = torch.zeros(k, k, dtype=torch.bool)  # allowed[t, c]: class c may be the source of poison labelled t
        for s, t in pairs:
            allowed[t, s] = True
        if self.relabel == "auto":
            for t in self.column_targets(inspection):  # all-to-one evidence: any class but t
                allowed[t] = True
                allowed[t, t] = False
        out = pred.clone()
        idx = torch.nonzero(flagged).flatten()
        if idx.numel():
            mask = allowed[y[idx]]
            restricted = prob[idx].masked_fill(~mask, -1.0).argmax(1)
            has = mask.any(1)
            out[idx[has]] = restricted[has]
        return out


def otsu_separation(values: torch.Tensor) -> float:
    """Otsu's separability eta in [0, 1]: the between-cluster share of the variance at Otsu's split
    (1 = two tight clusters; 1 also when all values are equal, nothing to split)."""
    v = values.double().flatten()
    if v.numel() < 2 or float(v.var(unbiased=False)) < 1e-12:
        return 1.0
    thr = otsu_threshold(v)
    lo, hi = v[v <= thr], v[v > thr]
    if lo.numel() == 0 or hi.numel() == 0:
        return 1.0
    between = lo.numel() * hi.numel() / v.numel() ** 2 * float(hi.mean() - lo.mean()) ** 2
    return float(between / float(v.var(unbiased=False)))


def _shift(v: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate (C, H, W) by (dy, dx) pixels, filling with zeros (no wrap-around)."""
    out = torch.zeros_like(v)
    h, w = v.shape[-2:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = v[..., ys, xs]
    return out
