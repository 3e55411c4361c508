"""A null of the pairwise scan fitted on clean models: calibrated verdicts (issue 22).

The MAD rule of :mod:`backdoorlab.defenses.pairwise` compares a pair with the other pairs of the
same model. Natural look-alike pairs (7 -> 1, 4 -> 9 on digits) are small in *every* model, so a
within-model rule flags clean models and hides a planted pair behind a look-alike one. Here each
pair is compared with the same pair in clean models instead: per pair, the mean and standard
deviation of its log-norm residual (log d(v) minus its row and column medians, as the MAD rule
computes it, but over the pairs that reached pi only) over N clean models of the same data; per target, the same for the column medians
(an all-to-one trigger shrinks a whole column). A suspect's score is the z-score of its most
anomalous pair (resp. target), on the small side.

Standard deviations are floored at the median standard deviation of all pairs (with ~15 models a
pair's own SD is noisy; a pair that happened to vary little must not become a hair trigger).

Thresholds are fitted on the clean models alone, leave-one-out (each model scored against the null
of the others, so its own numbers do not shrink its z): the larger of their largest z and a
Gaussian 1% tail of those maxima (mean + 2.33 SD). The null and its thresholds are saved with the
class count and input shape they hold for; a suspect of another shape is refused.

:class:`TargetNull` is the same idea for one value per target (Neural Cleanse's mask norms): each
target's log value minus the model's median log value, as a z-score against the same target in
clean models (SDs floored at their median), with the same leave-one-out tail threshold.

Tried on the MNIST population and not kept (docs/populations.md): a null of each pattern's transfer
to clean reference models, and of its locality (L1 share in the best 5x5 window), alone, summed with
the norm's z, or gating it; each lowered the evaluation half's AUROC (0.933 -> 0.64-0.90).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from backdoorlab.errors import BackdoorLabError

TAIL_Z = 2.326  # one-sided Gaussian 1% quantile


def residuals(norms: torch.Tensor, reached: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pair residuals (K, K), column medians (K,)) of the log norms; NaN on the diagonal and, given
    ``reached``, on the pairs that did not reach pi (their norm is the search's budget, not a
    measurement: with them in, a model with many unreached pairs has its medians set by the budget)."""
    logn = norms.clamp_min(1e-6).log()
    if reached is not None:
        logn = logn.masked_fill(~reached.bool(), float("nan"))
    rowmed = logn.nanmedian(1, keepdim=True).values
    colmed = logn.nanmedian(0, keepdim=True).values
    return logn - rowmed - colmed, colmed.flatten()


def _mean_sd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = x.nanmean(0)
    sd = (x - mu).pow(2).nanmean(0).mul(x.shape[0] / max(x.shape[0] - 1, 1)).sqrt()
    floor = sd[torch.isfinite(sd)].median() if torch.isfinite(sd).any() else torch.tensor(1.0, dtype=sd.dtype)
    return mu, sd.clamp_min(float(floor))


class _NullFile:
    """What both nulls share: the task they hold for, the scan settings, and their files
    (safetensors: tensors + JSON metadata; nothing is unpickled)."""

    KIND = ""
    FOR = ""  # which inspector takes this calibration
    n_models: int
    input_shape: tuple[int, ...]
    source: str
    scan: dict
    architectures: tuple[str, ...]  # of the clean models, where known (a model's registered name)

    @property
    def num_classes(self) -> int:
        raise NotImplementedError

    def _calibrated_on(self) -> str:
        archs = sorted(set(self.architectures))
        counts = ", ".join(f"{a} x{self.architectures.count(a)}" for a in archs)
        said = "; ".join(x for x in (self.source, counts) if x)
        return f"calibrated on {self.n_models} clean models{f' ({said})' if said else ''}"

    def architecture_note(self, model: object) -> str:
        """'' or why the verdict may not hold: the suspect's architecture (a registered model's name) is
        not among the clean models' (a null of other architectures raises more false alarms and finds fewer
        backdoors: docs/populations.md, "Nulls per architecture")."""
        name = getattr(getattr(model, "spec", None), "name", None)
        known = sorted({a for a in self.architectures if a != "unknown"})
        if name is None or not known or name in known:
            return ""
        note = (f"the suspect's architecture {name!r} is not among the calibration models' ({', '.join(known)}): "
                "calibrate on clean models of its architecture")
        logging.getLogger(__name__).warning("%s", note)
        return f"; {note}"

    def check(self, num_classes: int, input_shape: Sequence[int], scan: dict | None = None) -> None:
        """Refuse a suspect of another task, or scanned with other settings than the clean models."""
        diff = {k: (v, scan.get(k)) for k, v in self.scan.items() if scan.get(k) != v} if scan is not None else {}
        if diff:
            said = ", ".join(f"{k} {a} (here {b})" for k, (a, b) in sorted(diff.items()))
            raise BackdoorLabError(f"the calibration was fitted with {said}; scan the suspect with the same settings "
                                   "(e.g. --images-per-class, --pi) or calibrate again")
        if num_classes != self.num_classes or tuple(input_shape) != tuple(self.input_shape):
            raise BackdoorLabError(
                f"the calibration holds for {self.num_classes} classes of shape {tuple(self.input_shape)}, the suspect "
                f"has {num_classes} classes of shape {tuple(input_shape)}; calibrate on clean models of the suspect's "
                "data (`backdoorlab calibrate`)")

    def _tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _meta(self) -> dict[str, str]:
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save as st_save

        from backdoorlab.atomic import atomic_write_bytes

        meta = {"kind": self.KIND, "n_models": str(self.n_models), "input_shape": json.dumps(list(self.input_shape)),
                "source": self.source, "scan": json.dumps(self.scan), "architectures": json.dumps(list(self.architectures)),
                **self._meta()}
        blob = st_save({k: v.contiguous() for k, v in self._tensors().items()}, metadata=meta)
        atomic_write_bytes(Path(path), blob)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path):
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise BackdoorLabError(f"calibration file {p} does not exist; write one with `backdoorlab calibrate`")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a truncated or foreign file
            raise BackdoorLabError(f"{p} is not a backdoorlab calibration file ({type(e).__name__}); "
                                   "write one with `backdoorlab calibrate`") from None
        kind = meta.get("kind")
        if kind != cls.KIND:
            other = next((c for c in _NullFile.__subclasses__() if c.KIND == kind), None)
            if other is None:
                raise BackdoorLabError(f"{p} is not a backdoorlab calibration file (kind {kind!r}); "
                                       "write one with `backdoorlab calibrate`")
            raise BackdoorLabError(f"{p} calibrates {other.FOR}, not {cls.FOR}; give it to {other.FOR}, or calibrate "
                                   f"{cls.FOR} (`backdoorlab calibrate --inspector {cls.FOR}`)")
        try:
            return cls._build(t, meta, (int(meta["n_models"]), tuple(json.loads(meta["input_shape"])),
                                        meta.get("source", ""), json.loads(meta.get("scan", "{}")),
                                        tuple(str(a) for a in json.loads(meta.get("architectures", "[]")))))
        except Exception as e:
            raise BackdoorLabError(f"{p} is not a backdoorlab calibration file ({type(e).__name__}); "
                                   "write one with `backdoorlab calibrate`") from None

    @classmethod
    def _build(cls, t: dict, meta: dict, common: tuple):
        raise NotImplementedError


@dataclass(frozen=True)
class PairNull(_NullFile):
    """Per-pair and per-target statistics of N clean models, with their calibrated thresholds."""

    KIND = "backdoorlab-pair-null"
    FOR = "pairwise"

    pair_mean: torch.Tensor  # (K, K)
    pair_sd: torch.Tensor
    col_mean: torch.Tensor  # (K,)
    col_sd: torch.Tensor
    threshold: float  # on the pair z
    target_threshold: float  # on the target z
    n_models: int
    input_shape: tuple[int, ...]
    source: str = ""
    scan: dict = field(default_factory=dict)  # the scan settings it was fitted with (a suspect must use the same)
    architectures: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return int(self.col_mean.numel())

    def describe(self) -> str:
        return f"{self._calibrated_on()}: pair z > {self.threshold:.2f} or target z > {self.target_threshold:.2f}"

    def zscores(self, norms: torch.Tensor, reached: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pair z (K, K), NaN where the pair was not reached or on the diagonal; target z (K,)),
        positive when the pair (target) is smaller than in the clean models."""
        return _z(self.pair_mean, self.pair_sd, self.col_mean, self.col_sd, norms, reached)

    def score(self, norms: torch.Tensor, reached: torch.Tensor) -> float:
        """One number per model: the largest of pair z / its threshold and target z / its threshold
        (>= 1: flagged)."""
        pz, cz = self.zscores(norms, reached)
        return _combined(pz, cz, self.threshold, self.target_threshold)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"pair_mean": self.pair_mean, "pair_sd": self.pair_sd, "col_mean": self.col_mean, "col_sd": self.col_sd}

    def _meta(self) -> dict[str, str]:
        return {"threshold": repr(self.threshold), "target_threshold": repr(self.target_threshold)}

    @classmethod
    def _build(cls, t: dict, meta: dict, common: tuple) -> "PairNull":
        return cls(t["pair_mean"], t["pair_sd"], t["col_mean"], t["col_sd"], float(meta["threshold"]),
                   float(meta["target_threshold"]), *common)


@dataclass(frozen=True)
class TargetNull(_NullFile):
    """Per-target statistics of one positive value per target (small = suspicious; Neural Cleanse's
    mask L1 norms) over N clean models, with the calibrated threshold on the target z."""

    KIND = "backdoorlab-target-null"
    FOR = "neural-cleanse"
    mean: torch.Tensor  # (K,) of the log value minus the model's median log value
    sd: torch.Tensor
    threshold: float
    n_models: int
    input_shape: tuple[int, ...]
    source: str = ""
    scan: dict = field(default_factory=dict)
    architectures: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return int(self.mean.numel())

    @property
    def target_threshold(self) -> float:
        return self.threshold

    def describe(self) -> str:
        return f"{self._calibrated_on()}: target z > {self.threshold:.2f}"

    def zscores(self, values: torch.Tensor, reached: torch.Tensor) -> torch.Tensor:
        """(K,) z, positive when the target's value is smaller (relative to the model's median) than
        in the clean models; -inf where the target was not reached."""
        return _target_z(self.mean, self.sd, values, reached)

    def score(self, values: torch.Tensor, reached: torch.Tensor) -> float:
        """The largest target z in units of the threshold (>= 1: flagged)."""
        return float(self.zscores(values, reached).max()) / self.threshold

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "sd": self.sd}

    def _meta(self) -> dict[str, str]:
        return {"threshold": repr(self.threshold)}

    @classmethod
    def _build(cls, t: dict, meta: dict, common: tuple) -> "TargetNull":
        return cls(t["mean"], t["sd"], float(meta["threshold"]), *common)


def target_residuals(values: torch.Tensor) -> torch.Tensor:
    """(K,) log values minus their median (a model's scale does not count, only its shape)."""
    v = values.double().clamp_min(1e-6).log()
    return v - v.median()


def _target_z(mean: torch.Tensor, sd: torch.Tensor, values: torch.Tensor, reached: torch.Tensor) -> torch.Tensor:
    z = (mean.double() - target_residuals(values)) / sd.double()
    return z.masked_fill(~reached.bool(), -math.inf)


def _z(pm, psd, cm, csd, norms, reached):
    res, col = residuals(norms, reached)
    pz = (pm - res) / psd
    pz.fill_diagonal_(float("nan"))
    return pz, torch.nan_to_num((cm - col) / csd, nan=-math.inf)  # a column with no reached pair: no evidence


def _combined(pz: torch.Tensor, cz: torch.Tensor, thr: float, tthr: float) -> float:
    p = pz[torch.isfinite(pz)]
    a = float(p.max()) / thr if p.numel() else -math.inf
    return max(a, float(cz.max()) / tthr)


def _max_z(pz: torch.Tensor) -> float:
    p = pz[torch.isfinite(pz)]
    return float(p.max()) if p.numel() else -math.inf


def tail_threshold(clean_maxima: Sequence[float], default: float = 3.0) -> float:
    """The threshold over clean models' leave-one-out maxima: the larger of their largest and their
    Gaussian 1% tail (mean + 2.33 SD); ``default`` with fewer than two finite maxima."""
    v = torch.tensor([x for x in clean_maxima if math.isfinite(x)], dtype=torch.float64)
    return max(float(v.max()), float(v.mean() + TAIL_Z * v.std())) if v.numel() > 1 else default


def _check_models(classes: list[int]) -> int:
    """The number of calibration models, refusing fewer than 3 or models of different class counts."""
    n = len(classes)
    if n < 3:
        raise BackdoorLabError(f"calibration needs at least 3 clean models (got {n}); give more models")
    if len(set(classes)) != 1:
        raise BackdoorLabError(f"the calibration models disagree on the number of classes ({sorted(set(classes))}); "
                               "give models of one data set")
    return n


def fit(norms: Sequence[torch.Tensor], reached: Sequence[torch.Tensor], input_shape: Sequence[int],
        source: str = "", scan: dict | None = None, architectures: Sequence[str] = ()) -> PairNull:
    """The null of ``norms`` ((K, K) per clean model; ``reached`` the pairs that reached pi), with
    leave-one-out thresholds. Needs 3 or more models."""
    n = _check_models([int(x.shape[0]) for x in norms])
    res = torch.stack([residuals(x, r)[0] for x, r in zip(norms, reached)])
    col = torch.stack([residuals(x, r)[1] for x, r in zip(norms, reached)])
    pair_max, col_max = [], []
    for i in range(n):
        keep = [j for j in range(n) if j != i]
        pm, psd = _mean_sd(res[keep])
        cm, csd = _mean_sd(col[keep])
        pz, cz = _z(pm, psd, cm, csd, norms[i], reached[i])
        pair_max.append(_max_z(pz))
        col_max.append(float(cz.max()))

    pm, psd = _mean_sd(res)
    cm, csd = _mean_sd(col)
    return PairNull(pm.float(), psd.float(), cm.float(), csd.float(), tail_threshold(pair_max), tail_threshold(col_max), n,
                    tuple(int(s) for s in input_shape), source, dict(scan or {}), tuple(architectures))


def fit_targets(values: Sequence[torch.Tensor], reached: Sequence[torch.Tensor], input_shape: Sequence[int],
                source: str = "", scan: dict | None = None, architectures: Sequence[str] = ()) -> TargetNull:
    """The null of ``values`` ((K,) per clean model, positive, small = suspicious; ``reached`` the
    targets whose search succeeded), with a leave-one-out threshold. Needs 3 or more models."""
    n = _check_models([int(x.numel()) for x in values])
    res = torch.stack([target_residuals(v) for v in values])
    maxima = []
    for i in range(n):
        mu, sd = _mean_sd(res[[j for j in range(n) if j != i]])
        maxima.append(float(_target_z(mu, sd, values[i], reached[i]).max()))
    mu, sd = _mean_sd(res)
    return TargetNull(mu.float(), sd.float(), tail_threshold(maxima), n, tuple(int(s) for s in input_shape), source,
                      dict(scan or {}), tuple(architectures))
