"""Adversarial bias maps: detect a backdoor by comparing the mean adversarial images of a suspect
model with those of a reference model.

Paper: A. Borji, "Adversarial examples for backdoor detection" (seed 002; code at
github.com/aliborji/Backdoor_defense). Three kinds of starting inputs (a blank image, white noise,
unlabeled data) are pushed by iterated targeted FGSM (I-FGSM, Kurakin et al. 2017):

- Algorithm I, eq. 1: x <- clip(x - eps * sign(grad_x J(theta, x, y_target))) toward every class;
  each adversarial image is recorded under the class the model then predicts; the *bias map* of a
  class is the mean of the images recorded under it (and the share of images that fell there).
- Algorithm II, eq. 2: x <- clip(x - eps * sign(grad_x (J(x, y_target) - J(x, y_source)))) for
  every ordered pair (source, target), source != target; images are recorded under
  (source, prediction), a K x K grid of mean images.

The same is done for a clean reference model; the Euclidean distance between the suspect's and
the reference's maps, per class (Alg. I, seed figure 8) and per pair (Alg. II), is the seed's
statistic (``statistic="euclidean"``); the default class statistic, ``stamp``, tests each class's
map difference as a trigger (see below).
The seed stops at visual inspection and the distance bar chart; we add the MAD anomaly index of
Neural Cleanse (Wang et al. 2019) to turn the distances into a verdict: a class (a pair) whose
index exceeds ``threshold`` (``pair_threshold``) on the high side is flagged. The model is called
backdoored when a *class* is flagged; flagged pairs are reported beside it but do not decide the
verdict (Algorithm II also flags cells on clean suspects).

Deviations, and why:
- Batched: all K targets x all samples run as one I-FGSM program (chunks of ``chunk`` images; each
  chunk runs every iteration), both models see the *same* starting images (the same seed), and
  only running sums per class are kept (no list of images). The seed loops per target and sample.
- The same ``samples_per_class`` starting images serve every target (seed: "for a number of
  samples" per target, drawn independently); sharing them removes start-to-start variance from
  the suspect-reference comparison.
- A blank start is deterministic, so it runs one sample per target (the seed's figure 3 also uses
  "one blank image"); the blank image is all zeros (MNIST's background).
- White noise is uniform in [0, 1]; "unlabeled data" are random images of the defender's clean set
  (its labels are never read), drawn with replacement only when the set is smaller than asked.
- Several input kinds and eps values may be combined: the class (pair) statistic is the mean over
  settings of each setting's distances divided by their median (so that no setting's scale
  dominates); ``class_distance`` in the details is the plain mean of the raw distances.
- A class under which no image fell has an all-zero map (its distance to a non-empty map is then
  large, which is itself suspicious: the class vanished).
- Without a reference model (the seed always has one), each class's map is compared with the
  pixelwise median of the *other* classes' maps (Alg. I), and each pair cell with the median of
  its column's other cells (Alg. II, same target, other sources). This measures how much a
  class's adversarial mean stands out from the others' rather than how it changed, so digits that
  simply look different can outrank a planted trigger: a weaker test (benchmarks/bench_biasmaps.py).
- ``statistic='local'`` is our addition (not the default, which is ``stamp``, below): the
  difference map is z-scored pixel by pixel across classes and the largest window mean is kept
  (see :func:`_distance`). Two independently trained models (the issue's reference "trained with
  another seed") differ everywhere, which drowns a 5x5 trigger in the Euclidean norm; the seed
  fine-tunes its backdoored model from the clean one, where the maps differ little elsewhere.
- ``statistic='stamp'`` (the default; our addition): the seed reads the trigger off the target's
  bias map by eye (its figure 8 compares maps of a suspect fine-tuned from the reference, which
  differ only where the poison changed them). Between two independently trained models the maps
  differ everywhere, and the Euclidean distance often misses a planted trigger. So each class's
  map difference is read as a candidate trigger and tested: its ``stamp_pixels`` (25) entries of
  largest |suspect - reference| are set to 1 (difference > 0) or 0 (< 0) on ``stamp_images``
  (2,000) clean images, and the statistic is the largest, over source
  groups (the reference's prediction on the unstamped image), of the share of the group that the
  suspect then puts in the class minus the share the reference puts there. A planted trigger moves
  most of its source group with the suspect and none with the reference; natural differences of
  two models move a few images of a group either way. A class is flagged when its MAD anomaly
  index (scale floored at ``min_flip`` / 4) exceeds ``threshold`` and the share is at least
  ``min_flip`` (0.1). The best setting counts (the statistic is the largest over input kinds / eps:
  noise starts rarely draw a patch). Without a reference there is nothing to subtract (a class's
  own strokes, stamped, send images to it), so it falls back to the Euclidean distance. The
  Euclidean distances are still reported (``class_distance``, the seed's figure 8) and used for
  Algorithm II's pair grid.
- Where the reference comes from: ``inspect(model, clean, reference=...)``, or a model file in
  ``reference``; in experiment YAML ``reference_seed`` makes the runner train a clean reference
  (the victim's architecture and training config, the same clean split, that seed).

Measurements: docs/bias-maps.md.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from backdoorlab.defenses._bias_maps_stats import (  # noqa: F401  (ifgsm, MAD_FLOOR: public here)
    MAD_FLOOR, _BiasMapStats, _Maps, _run, ifgsm,
)
from backdoorlab.defenses.base import DEFENSES, InspectionResult, Inspector
from backdoorlab.defenses.common import check_model_matches, frozen
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

log = logging.getLogger(__name__)

Kind = Literal["blank", "noise", "data"]
KINDS = ("blank", "noise", "data")


@DEFENSES.register("bias-maps", "adversarial bias maps (I-FGSM mean images per class and pair) vs a reference model (seed 002)")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class BiasMaps(_BiasMapStats, Inspector):
    inputs: tuple[Kind, ...] = Field(("data", "noise"), description="starting inputs: blank, noise, data (one or more)")
    eps: tuple[float, ...] = Field((0.1,), description="I-FGSM step(s) in (0, 1]; one setting per (input, eps)")
    iterations: int = Field(10, description="I-FGSM iterations (the seed: 10)")
    samples_per_class: int = Field(1000, ge=1, description="Algorithm I: starting images per target class (the seed: 1,000)")
    pair_samples: int = Field(20, ge=0, description="Algorithm II: starting images per (source, target) pair; 0 skips it")
    statistic: Literal["stamp", "euclidean", "local"] = Field(
        "stamp", description="class statistic: stamp (the map difference's strongest pixels stamped on clean images: "
                             "how many more go to the class with the suspect than with the reference), euclidean (the "
                             "seed's map distance) or local (largest window of the difference's robust z-score)")
    window: int = Field(5, ge=1, description="local statistic: window side in pixels")
    stamp_pixels: int = Field(25, ge=1, description="stamp statistic: pixels (entries) of each class's map difference stamped")
    stamp_images: int = Field(2000, ge=1, description="stamp statistic: clean images the stamps are tested on")
    min_group: int = Field(10, ge=1, description="stamp statistic: fewest images of a source group for its share to count")
    min_flip: float = Field(0.1, ge=0.0, le=1.0, description="stamp statistic: a class is flagged only when its stamp sends "
                                                             "at least this share of one source group to it (beyond the reference)")
    threshold: float = Field(3.0, gt=0.0, description="MAD anomaly index above which a class is flagged")
    pair_threshold: float = Field(4.0, gt=0.0, description="MAD anomaly index above which a pair is flagged")
    reference: Optional[str] = Field(None, description="reference model file (TorchScript or safetensors); or pass one to inspect()")
    reference_arch: Optional[str] = Field(None, description="architecture of plain safetensors reference weights")
    reference_seed: Optional[int] = Field(
        None, ge=0, description="experiment runner: train a clean reference with this seed on the same clean training split")
    chunk: int = Field(128, ge=1, description="images per I-FGSM batch (CPU throughput peaks near 128)")
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.inputs:
            raise BackdoorLabError(f"bias-maps needs at least one input kind; choose from {', '.join(KINDS)}")
        if not self.eps:
            raise BackdoorLabError("bias-maps needs at least one eps value, e.g. eps: [0.1]")
        bad = [e for e in self.eps if not (0.0 < e <= 1.0)]
        if bad:
            raise BackdoorLabError(f"bias-maps eps must lie in (0, 1] (a step on [0, 1] pixels); got {bad[0]!r}: "
                                   "use e.g. eps=0.1 (the seed's choice) or 0.5")
        if self.iterations < 1:
            raise BackdoorLabError(f"bias-maps iterations must be at least 1 (got {self.iterations}); "
                                   "the seed uses 10")

    # ------------------------------------------------------------------ inputs
    def starts(self, clean: ImageSet, kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
        """Starting images (n', C, H, W) in [0, 1] of one kind (n' = 1 for ``blank``)."""
        c, h, w = clean.shape
        if kind == "blank":
            return torch.zeros(1, c, h, w)
        if kind == "noise":
            return torch.rand(n, c, h, w, generator=generator)
        if len(clean) == 0:
            raise BackdoorLabError("input kind 'data' needs images: the clean set is empty")
        if len(clean) >= n:
            idx = torch.randperm(len(clean), generator=generator)[:n]
        else:
            log.warning("input kind 'data': %d images asked, the clean set has %d; drawing with replacement", n, len(clean))
            idx = torch.randint(0, len(clean), (n,), generator=generator)
        return clean.float_batch(idx)

    def _generator(self, kind: str, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1000 + 10 * KINDS.index(kind) + salt)

    # ------------------------------------------------------------------ the two algorithms
    def algorithm1(self, model: nn.Module, clean: ImageSet, kind: str, eps: float) -> _Maps:
        """Bias maps of every class: (K, C, H, W) mean images and counts (K,)."""
        k = clean.num_classes
        starts = self.starts(clean, kind, self.samples_per_class, self._generator(kind, 1))
        n = starts.shape[0]
        target = torch.arange(k).repeat_interleave(n)
        start_idx = torch.arange(n).repeat(k)
        with frozen(model):
            return _run(model, starts, start_idx, target, None, k, eps, self.iterations, self.chunk,
                        f"bias maps ({kind}, eps {eps:g})")

    def algorithm2(self, model: nn.Module, clean: ImageSet, kind: str, eps: float) -> _Maps:
        """Pair maps: (K*K, C, H, W) mean images recorded under (source, prediction), counts (K*K,)."""
        k = clean.num_classes
        starts = self.starts(clean, kind, self.pair_samples, self._generator(kind, 2))
        n = starts.shape[0]
        pairs = torch.tensor([(s, t) for s in range(k) for t in range(k) if s != t])
        src = pairs[:, 0].repeat_interleave(n)
        tgt = pairs[:, 1].repeat_interleave(n)
        start_idx = torch.arange(n).repeat(pairs.shape[0])
        with frozen(model):
            return _run(model, starts, start_idx, tgt, src, k, eps, self.iterations, self.chunk,
                        f"pair maps ({kind}, eps {eps:g})")

    # ------------------------------------------------------------------ reference
    def load_reference(self, clean: ImageSet) -> nn.Module | None:
        if self.reference is None:
            return None
        from backdoorlab.models import load_model

        p = Path(self.reference)
        try:
            return load_model(p, arch=self.reference_arch, num_classes=clean.num_classes, input_shape=clean.shape)
        except BackdoorLabError as exc:
            raise BackdoorLabError(f"reference model {p}: {exc}; the reference must be a model of the same task "
                                   "(same classes and image shape) as the suspect") from exc

    @staticmethod
    def check_reference(model: nn.Module, reference: nn.Module, clean: ImageSet) -> None:
        """The reference must take the suspect's images and output as many classes."""
        for what, m in (("suspect", model), ("reference", reference)):
            k = getattr(m, "num_classes", None)
            shape = getattr(m, "input_shape", None)
            if shape is not None and tuple(shape) != tuple(clean.shape):
                raise BackdoorLabError(
                    f"the {what} model expects images of shape {tuple(shape)} but the data (and the "
                    f"{'reference' if what == 'suspect' else 'suspect'}) use {tuple(clean.shape)}; give a reference "
                    "trained on the same kind of images as the suspect")
            if k is not None and k != clean.num_classes:
                raise BackdoorLabError(
                    f"the {what} model has {k} classes but the data has {clean.num_classes}; give a reference "
                    "model trained on the same classes as the suspect")
        probe = clean.float_batch(slice(0, 2)) if len(clean) else torch.zeros(2, *clean.shape)
        with torch.no_grad(), frozen(model), frozen(reference):
            try:
                outs = [m(probe) for m in (model, reference)]
            except RuntimeError as exc:
                raise BackdoorLabError(f"the suspect or the reference model fails on images of shape {tuple(clean.shape)}: "
                                       f"{str(exc).splitlines()[0]}; both must take the same images") from exc
        if outs[0].shape[-1] != outs[1].shape[-1]:
            raise BackdoorLabError(f"the suspect has {outs[0].shape[-1]} classes but the reference has {outs[1].shape[-1]}; "
                                   "give a reference model trained on the same classes as the suspect")

    # ------------------------------------------------------------------ API
    def model_maps(self, model: nn.Module, clean: ImageSet) -> dict[str, dict]:
        """Both algorithms on one model for every (input kind, eps) setting, keyed ``kind@eps``:
        ``maps`` (K, C, H, W), ``percent`` (K,), and with Algorithm II ``pair_maps`` (K, K, C, H, W)
        and ``pair_counts`` (K, K); ``seconds_algorithm1`` / ``seconds_algorithm2``. The starting
        images depend only on ``seed`` and ``clean``, so two models' maps are comparable."""
        from backdoorlab.defenses.inference import inference_model

        check_model_matches(model, clean)
        with frozen(model):
            fast = inference_model(model, torch.zeros(2, *clean.shape), accelerate=False)
        k = clean.num_classes
        out: dict[str, dict] = {}
        for kind in self.inputs:
            for e in self.eps:
                s0 = time.perf_counter()
                a = self.algorithm1(fast, clean, kind, float(e))
                entry = {"kind": kind, "eps": float(e), "maps": a.maps, "percent": a.percent,
                         "seconds_algorithm1": time.perf_counter() - s0}
                if self.pair_samples > 0:
                    s0 = time.perf_counter()
                    b = self.algorithm2(fast, clean, kind, float(e))
                    entry.update(pair_maps=b.maps.view(k, k, *clean.shape), pair_counts=b.counts.view(k, k),
                                 seconds_algorithm2=time.perf_counter() - s0)
                out[f"{kind}@{float(e):g}"] = entry
        return out

    def wants_reference(self) -> int | None:
        return self.reference_seed

    def inspect(self, model: nn.Module, clean: ImageSet, *, reference: nn.Module | None = None) -> InspectionResult:
        """Compare the suspect ``model``'s bias maps with those of ``reference`` (or of the model
        file named by the ``reference`` field; without either, the no-reference fallback).

        ``clean``: the defender's images (labels unused; they only supply 'data' starts and the
        image shape / class count). Result: ``scores`` (K,) per-class statistic, ``anomaly`` (K,),
        ``flagged_targets`` the flagged classes, ``flagged_pairs`` from Algorithm II; the maps,
        percentages and per-setting distances in ``details``.
        """
        t0 = time.perf_counter()
        check_model_matches(model, clean)
        if reference is None:
            reference = self.load_reference(clean)
        if reference is not None:
            self.check_reference(model, reference, clean)
        sus = self.model_maps(model, clean)
        ref = self.model_maps(reference, clean) if reference is not None else None
        stamp = self.stamp_test(model, reference, clean, sus, ref) if self.statistic == "stamp" and reference is not None else None
        res = self.compare(sus, ref, stamp=stamp)
        res.details["seconds"] = time.perf_counter() - t0
        return res

    # ---- report hooks
    report_keys = ("top_class", "with_reference")

    def metrics(self, result: InspectionResult) -> dict[str, float]:
        d = result.details
        return {"top_class": float(d["top_class"]), "with_reference": float(d.get("reference") == "model")}

    def figures(self, result: InspectionResult, truth: torch.Tensor | None = None) -> dict[str, bytes]:
        from backdoorlab.plots_biasmaps import figures

        return {n.rsplit(".", 1)[0]: png for n, png in figures(result).items()}

    def summary(self, result: InspectionResult) -> dict:
        d = result.details
        k = len(d["class_distance"])
        pair_a = d.get("pair_anomaly")
        top_pairs = []
        if pair_a is not None:
            a = pair_a.clone()
            a[~a.isfinite()] = -float("inf")
            for i in a.flatten().argsort(descending=True)[:5].tolist():
                s, t = divmod(int(i), k)
                top_pairs.append({"source": s, "target": t, "distance": float(d["pair_distance"][s, t]),
                                  "anomaly_index": float(pair_a[s, t])})
        return {
            "flagged_classes": result.flagged_targets,
            "class_distance": [round(float(v), 6) for v in d["class_distance"]],
            "class_statistic": [round(float(v), 6) for v in d["class_statistic"]],
            "anomaly_index": [round(float(v), 4) for v in result.anomaly], "top_class": d["top_class"],
            "top_pairs": top_pairs, "reference": d["reference"], "settings": d["settings"], "statistic": d["statistic"],
            "percent": {n: [round(float(v), 3) for v in e["suspect_percent"]] for n, e in d["bias_maps"].items()},
            "seconds_algorithm1": round(d["seconds_algorithm1"], 3), "seconds_algorithm2": round(d["seconds_algorithm2"], 3),
        }
