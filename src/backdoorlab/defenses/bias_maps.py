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
verdict (on full MNIST, Algorithm II flags cells ending in class 1 on clean suspects too:
benchmarks/bench_biasmaps.py, NOTES-issue6.md).

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
- ``statistic='local'`` is our addition (the default stays the seed's Euclidean distance): the
  difference map is z-scored pixel by pixel across classes and the largest window mean is kept
  (see :func:`_distance`). Two independently trained models (the issue's reference "trained with
  another seed") differ everywhere, which drowns a 5x5 trigger in the Euclidean norm; the seed
  fine-tunes its backdoored model from the clean one, where the maps differ little elsewhere.
- ``statistic='stamp'`` (default; our addition, measured in benchmarks/bench_biasmaps.py and
  NOTES-issue6.md): the seed reads the trigger off the target's bias map by eye (its figure 8
  compares maps of a suspect fine-tuned from the reference, which differ only where the poison
  changed them). Between two independently trained models the maps differ everywhere, and the
  Euclidean distance ranked the target or source first in 1 of the seed's 4 fixed-patch attacks on
  full MNIST. So each class's map difference is read as a candidate trigger and tested: its
  ``stamp_pixels`` (25) entries of largest |suspect - reference| are set to 1 (difference > 0) or 0
  (< 0) on ``stamp_images`` (2,000) clean images, and the statistic is the largest, over source
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
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from backdoorlab.defenses.base import DEFENSES, InspectionResult, Inspector, mad_anomaly_index
from backdoorlab.defenses.common import check_model_matches, checked_logits, frozen
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

log = logging.getLogger(__name__)

Kind = Literal["blank", "noise", "data"]
KINDS = ("blank", "noise", "data")


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return checked_logits(model(x.contiguous(memory_format=torch.channels_last)))


def ifgsm(model: nn.Module, x0: torch.Tensor, target: torch.Tensor, eps: float, iterations: int,
          source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Targeted I-FGSM on a batch: ``iterations`` steps of x <- clip(x - eps * sign(grad)) of
    J(x, target) (eq. 1), or of J(x, target) - J(x, source) when ``source`` is given (eq. 2).

    ``x0`` float (B, C, H, W) in [0, 1], ``target``/``source`` int64 (B,). Returns the adversarial
    images (B, C, H, W) in [0, 1] and the model's predictions on them (B,). The model's parameter
    gradients are not touched (call it inside :func:`~backdoorlab.defenses.common.frozen`).
    """
    x = x0.detach().clone()
    for _ in range(iterations):
        x.requires_grad_(True)
        logits = _forward(model, x)
        loss = F.cross_entropy(logits, target, reduction="sum")
        if source is not None:
            loss = loss - F.cross_entropy(logits, source, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
        x = (x.detach() - eps * g.sign()).clamp_(0.0, 1.0)
    with torch.no_grad():
        pred = _forward(model, x).argmax(1)
    return x, pred


@dataclasses.dataclass(frozen=True)
class _Maps:
    """Running result of one algorithm on one model: ``maps`` (G, C, H, W) mean images per group
    (a class, or a (source, prediction) cell flattened as source * K + prediction), ``counts`` (G,)."""

    maps: torch.Tensor
    counts: torch.Tensor

    @property
    def percent(self) -> torch.Tensor:
        return 100.0 * self.counts.double() / max(1, int(self.counts.sum()))


def _progress(total: int, what: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency of the test extra only
        return None
    return tqdm(total=total, desc=what, unit="img", leave=False, disable=None)


def _run(model: nn.Module, starts: torch.Tensor, start_idx: torch.Tensor, target: torch.Tensor,
         source: torch.Tensor | None, num_classes: int, eps: float, iterations: int, chunk: int, what: str) -> _Maps:
    """I-FGSM on every (start, target[, source]) combination in chunks; the adversarial image is
    added to the sum of its group: the prediction (eq. 1), or source * K + prediction (eq. 2)."""
    groups = num_classes if source is None else num_classes * num_classes
    n = start_idx.numel()
    sums = torch.zeros(groups, *starts.shape[1:], dtype=torch.float64)
    counts = torch.zeros(groups, dtype=torch.long)
    bar = _progress(n, what)
    for s in range(0, n, chunk):
        sl = slice(s, s + chunk)
        x, pred = ifgsm(model, starts[start_idx[sl]], target[sl], eps, iterations,
                        None if source is None else source[sl])
        key = pred if source is None else source[sl] * num_classes + pred
        sums.index_add_(0, key, x.double())
        counts += torch.bincount(key, minlength=groups)
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    maps = (sums / counts.clamp_min(1).double().view(-1, *([1] * (sums.dim() - 1)))).float()
    return _Maps(maps, counts)


MAD_FLOOR = 0.01  # pixel units: a pixel whose change is this consistent across classes is not "infinitely" odd


def _distance(a: torch.Tensor, b: torch.Tensor, statistic: str, window: int) -> torch.Tensor:
    """Distance per group between maps ``a`` and ``b`` (G, C, H, W) (a class, or a pair cell).

    ``euclidean``: ||a - b||_2 (the seed's figure 8). ``local``: the difference D = a - b
    (channels averaged) is turned, pixel by pixel, into a robust z-score across the groups,
    (D_g - median_g D) / (1.4826 MAD_g D + 0.01); the statistic is the largest |mean z| over
    ``window`` x ``window`` windows. A planted trigger changes one group's map in one place where
    the other groups' maps agree; two independently trained models differ everywhere, and at
    pixels where every class differs (or differs erratically) the z-score stays small.
    """
    diff = a - b
    if statistic == "euclidean":
        return diff.flatten(1).norm(dim=1)
    d = diff.mean(1)  # (G, H, W)
    med = d.median(0).values
    mad = (d - med).abs().median(0).values * 1.4826 + MAD_FLOOR
    z = ((d - med) / mad)[:, None]
    w = min(window, d.shape[-1], d.shape[-2])
    return F.avg_pool2d(z, w, stride=1).abs().flatten(1).amax(1)


def _median_others(maps: torch.Tensor) -> torch.Tensor:
    """(K, D) -> (K, D): row k is the elementwise median of the other rows."""
    k = maps.shape[0]
    idx = torch.tensor([[j for j in range(k) if j != i] for i in range(k)])
    return maps[idx].median(dim=1).values


@DEFENSES.register("bias-maps", "adversarial bias maps (I-FGSM mean images per class and pair) vs a reference model (seed 002)")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class BiasMaps(Inspector):
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

    def inspect(self, model: nn.Module, clean: ImageSet, reference: nn.Module | None = None) -> InspectionResult:
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

    def stamps(self, suspect: dict[str, dict], reference: dict[str, dict] | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per setting, each class's candidate trigger from its map difference D = suspect - reference
        (no reference: the median of the other classes' maps): the ``stamp_pixels`` entries of largest
        |D| are replaced by 1 where D > 0 and by 0 where D < 0. Returns ``{setting: (mask, value)}``,
        both (K, C, H, W) (mask bool)."""
        out = {}
        for name, a in suspect.items():
            maps = a["maps"]
            other = reference[name]["maps"] if reference is not None else _median_others(maps.flatten(1)).view_as(maps)
            d = (maps - other).flatten(1)
            top = d.abs().topk(min(self.stamp_pixels, d.shape[1]), dim=1).indices
            mask = torch.zeros_like(d, dtype=torch.bool).scatter_(1, top, True)
            out[name] = (mask.view_as(maps), (d > 0).float().view_as(maps))
        return out

    @torch.no_grad()
    def stamp_test(self, model: nn.Module, reference: nn.Module | None, clean: ImageSet,
                   suspect: dict[str, dict], ref_maps: dict[str, dict] | None) -> dict[str, torch.Tensor]:
        """The ``stamp`` statistic (our addition; see the module notes): per setting, (K,) for each class
        c the largest, over source groups g != c, of the share of group g's images that c's stamp
        (:meth:`stamps`) sends to c with the suspect minus the share with the reference (without a
        reference: the suspect's share alone). ``stamp_images`` clean images; an image's group is
        the reference's prediction on it (labels are not read); images that either model already
        puts in c unstamped are left out for c, and groups under ``min_group`` images count 0."""
        k = clean.num_classes
        g = torch.Generator().manual_seed(self.seed * 1000 + 7)
        idx = torch.randperm(len(clean), generator=g)[: min(self.stamp_images, len(clean))]
        if idx.numel() == 0:
            raise BackdoorLabError("the stamp statistic needs clean images; the clean set is empty")
        x = clean.float_batch(idx)
        from backdoorlab.train import predict as pred  # batched, on the model's device, NaN-checked

        models = [m for m in (model, reference) if m is not None]

        out: dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            for m in models:
                stack.enter_context(frozen(m))
            base = [pred(m, x) for m in models]
            for name, (mask, value) in self.stamps(suspect, ref_maps).items():
                rate = torch.zeros(k)
                for c in range(k):
                    keep = torch.ones(len(x), dtype=torch.bool)
                    for b in base:
                        keep &= b != c
                    if not bool(keep.any()):
                        continue
                    xs = torch.where(mask[c], value[c], x[keep])
                    group = base[-1][keep]  # the reference's class of each image (the suspect's without one)
                    hits = [(pred(m, xs) == c).double() for m in models]
                    diff = hits[0] - (hits[1] if len(hits) > 1 else 0.0)
                    # per source group: a source-specific trigger moves one group only
                    n_g = torch.bincount(group, minlength=k).double()
                    share = torch.zeros(k, dtype=torch.float64).index_add_(0, group, diff) / n_g.clamp_min(1)
                    share[n_g < self.min_group] = 0.0
                    rate[c] = float(share.max())
                out[name] = rate
        return out

    def compare(self, suspect: dict[str, dict], reference: dict[str, dict] | None,
                stamp: dict[str, torch.Tensor] | None = None) -> InspectionResult:
        """The verdict from two :meth:`model_maps` outputs (same settings); ``reference`` None is the
        no-reference fallback (each class against the median of the others). With ``statistic="stamp"``
        the class statistic is ``stamp`` (:meth:`stamp_test`, per setting), its largest over settings;
        the Euclidean distances are still reported (``class_distance``) and drive the pair grid."""
        if self.statistic == "stamp" and stamp is None and reference is not None:
            raise BackdoorLabError("the stamp statistic needs the models: call inspect(), or pass stamp_test()'s output")
        # without a reference the stamp statistic falls back to the Euclidean distance (a class's own
        # strokes, stamped, send images to it whatever the model: there is nothing to subtract)
        dist_kind = "euclidean" if self.statistic == "stamp" else self.statistic
        used = "stamp" if stamp is not None else dist_kind
        stamp_images = self.stamps(suspect, reference) if stamp is not None else {}
        if reference is not None and set(reference) != set(suspect):
            raise BackdoorLabError(f"the reference maps have settings {sorted(reference)} but the suspect's "
                                   f"{sorted(suspect)}; compute both with the same bias-maps parameters")
        per_setting: dict[str, dict] = {}
        class_norm, class_raw, pair_norm, pair_raw = [], [], [], []
        t1 = t2 = 0.0
        k = next(iter(suspect.values()))["maps"].shape[0]
        for name, a in suspect.items():
            b = reference[name] if reference is not None else None
            if b is not None and b["maps"].shape != a["maps"].shape:
                raise BackdoorLabError(f"the reference maps have shape {tuple(b['maps'].shape)} but the suspect's "
                                       f"{tuple(a['maps'].shape)}: the two models must share classes and image shape")
            t1 += a["seconds_algorithm1"] + (b["seconds_algorithm1"] if b is not None else 0.0)
            maps = a["maps"]
            other = b["maps"] if b is not None else _median_others(maps.flatten(1)).view_as(maps)
            dist = _distance(maps, other, dist_kind, self.window)
            entry = {"kind": a["kind"], "eps": a["eps"], "suspect": a["maps"], "suspect_percent": a["percent"],
                     "reference": b["maps"] if b is not None else None,
                     "reference_percent": b["percent"] if b is not None else None, "distance": dist}
            class_raw.append(dist)
            class_norm.append(dist / dist.median().clamp_min(1e-12))
            if "pair_maps" in a:
                t2 += a["seconds_algorithm2"] + (b["seconds_algorithm2"] if b is not None else 0.0)
                grid = a["pair_maps"]
                if b is not None:
                    other_grid = b["pair_maps"]
                else:  # cell (s, t) against the median of column t's other cells
                    cols = grid.flatten(2).transpose(0, 1)  # (t, s, D)
                    other_grid = torch.stack([_median_others(c) for c in cols]).transpose(0, 1).reshape(grid.shape)
                off = ~torch.eye(k, dtype=torch.bool)  # (s, s) cells hold the images that never left s
                pd = torch.full((k, k), float("nan"))
                pd[off] = _distance(grid[off], other_grid[off], dist_kind, self.window)
                entry.update(pair_suspect=a["pair_maps"], pair_suspect_counts=a["pair_counts"],
                             pair_reference=b["pair_maps"] if b is not None else None,
                             pair_reference_counts=b["pair_counts"] if b is not None else None, pair_distance=pd)
                pair_raw.append(pd)
                pair_norm.append(pd / pd.nanmedian().clamp_min(1e-12))
            if stamp is not None:
                mask, value = stamp_images[name]
                entry.update(stamp_rate=stamp[name], stamp=torch.where(mask, value, torch.full_like(value, 0.5)))
            per_setting[name] = entry
        if stamp is not None:
            # the best setting counts: a stamp that works from one kind of start is enough (noise starts
            # rarely draw a patch trigger, and averaging would halve the data starts' signal)
            class_stat = torch.stack([stamp[name] for name in suspect]).amax(0)
            # shares near 0 for most classes make the MAD tiny: floor the scale at min_flip / 4
            class_anomaly = mad_anomaly_index(class_stat, min_scale=self.min_flip / 4).float()
            hit = (class_anomaly > self.threshold) & (class_stat >= self.min_flip)
        else:
            class_stat = torch.stack(class_norm).mean(0)
            class_anomaly = mad_anomaly_index(class_stat).float()
            hit = class_anomaly > self.threshold
        flagged = [int(c) for c in torch.nonzero(hit).flatten().tolist()]
        flagged.sort(key=lambda c: -float(class_anomaly[c]))
        flagged_pairs: list[tuple[int, int]] = []
        pair_stat = pair_anomaly = None
        if pair_norm:
            pair_stat = torch.stack(pair_norm).mean(0)
            pair_anomaly = mad_anomaly_index(pair_stat.flatten()).view(k, k).float()
            flagged_pairs = [(int(s), int(t)) for s, t in torch.nonzero(pair_anomaly > self.pair_threshold).tolist()]
            flagged_pairs.sort(key=lambda st: -float(pair_anomaly[st]))
        log.info("bias maps (%s reference): %d settings (alg. I %.1f s, alg. II %.1f s); flagged classes %s, pairs %s",
                 "a" if reference is not None else "no", len(suspect), t1, t2, flagged, flagged_pairs)
        return InspectionResult(
            backdoored=bool(flagged), flagged_pairs=flagged_pairs, flagged_targets=flagged,
            scores=class_stat.float(), anomaly=class_anomaly, patterns=None,
            details={
                "bias_maps": per_setting, "reference": "model" if reference is not None else "none",
                "statistic": used,
                "class_distance": torch.stack(class_raw).mean(0), "class_statistic": class_stat.float(),
                "pair_distance": torch.stack(pair_raw).mean(0) if pair_raw else None,
                "pair_statistic": pair_stat, "pair_anomaly": pair_anomaly,
                "top_class": int(class_stat.argmax()), "settings": list(suspect),
                "seconds": t1 + t2, "seconds_algorithm1": t1, "seconds_algorithm2": t2,
            },
        )
