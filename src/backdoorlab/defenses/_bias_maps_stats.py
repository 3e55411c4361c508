"""Map computation and statistics of :mod:`backdoorlab.defenses.bias_maps`.

Batched targeted I-FGSM (:func:`ifgsm`), the running per-group mean images (:func:`_run`), the
distances between maps (:func:`_distance`, :func:`_median_others`) and, in :class:`_BiasMapStats`,
the ``stamp`` test and the verdict (:meth:`~_BiasMapStats.compare`). The paper, the algorithms and
the deviations are documented in ``bias_maps``, beside the method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import nn

from backdoorlab.defenses.base import InspectionResult, mad_anomaly_index
from backdoorlab.defenses.common import checked_logits, frozen
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

log = logging.getLogger("backdoorlab.defenses.bias_maps")  # the method's logger


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


class _BiasMapStats:
    """The class and pair statistics of ``BiasMaps`` (a mixin; ``BiasMaps`` supplies the fields)."""

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
        """The ``stamp`` statistic (our addition; see the notes of :mod:`backdoorlab.defenses.bias_maps`): per setting, (K,) for each class
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
            scores=class_stat.float(), anomaly=class_anomaly, patterns=None, threshold=self.threshold,
            threshold_source=f"MAD anomaly index > {self.threshold:g}"
                             + (f" and stamp share >= {self.min_flip:g}" if self.statistic == "stamp" else ""),
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
