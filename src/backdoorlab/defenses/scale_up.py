"""InputDetector ``scale-up``: scaled prediction consistency.

Paper: J. Guo, Y. Li, X. Chen, H. Guo, L. Sun, C. Liu, "SCALE-UP: An Efficient Black-box
Input-level Backdoor Detection via Analyzing Scaled Prediction Consistency", ICLR 2023
(arXiv:2302.03251).

Each input x is amplified pixel-wise, x_n = clip(n * x, 0, 1) for every factor n of ``factors``
(default 2, 3, ..., 11: the paper's amplification up to 11 times, without the identity), and its
scaled prediction consistency SPC(x) is the share of the amplified copies whose predicted label
equals the prediction on x. A trigger that dominates the prediction survives amplification, so
poisoned inputs have SPC near 1 and benign ones lower. ``score(x)`` is SPC (higher = more
suspicious); only predicted labels are used (black box).

Modes:
- vanilla (default, ``standardise=False``): no clean data; ``detect`` flags SPC > ``threshold``
  (``threshold_rule="fixed"``). ``fit(model, clean)`` then only prepares the model (``clean`` may be None).
- data-limited (``standardise=True``, the paper's variant with some local benign samples): SPC is
  standardised by the mean and standard deviation of the clean images' SPC of the same predicted
  class (pooled where a class has fewer than 2 clean images), and the threshold applies to that.
- ``threshold_rule="quantile"``: the threshold is the ``1 - frr`` quantile of the clean images'
  scores (needs the clean set; a preset false rejection rate, as for STRIP).

All inputs x factors copies go through the model in batches of ``batch_size`` images.

Deviations: the paper leaves the threshold to the defender (it reports AUROC); our fixed default
(0.5 on SPC, 2.0 on standardised SPC) is stated here, and the quantile rule is the other choice.

Measurements: docs/cleansers.md.
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from backdoorlab.defenses.base import DEFENSES, DetectionResult, InputDetector
from backdoorlab.defenses.inference import inference_model
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

log = logging.getLogger(__name__)


@DEFENSES.register("scale-up", "SCALE-UP (Guo et al. 2023): predictions that stay the same when the pixels are amplified x2..x11 = trojaned; no clean data needed")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ScaleUp(InputDetector):
    """``fit(model, clean)`` -> self (clean may be None); ``spc(x)`` (N,) scaled prediction consistency; ``score(x)``
    = SPC (standardised with ``standardise``); ``detect(x)`` flags ``score > threshold``.
    ``x``: uint8 (N, C, H, W) or float in [0, 1]."""

    factors: tuple[float, ...] = Field((2, 3, 4, 5, 6, 7, 8, 9, 10, 11), min_length=1,
                                       description="pixel amplification factors (the paper: up to 11)")
    standardise: bool = Field(False, description="the paper's data-limited variant: standardise SPC with the clean "
                              "images' SPC statistics of the predicted class")
    threshold_rule: Literal["fixed", "quantile"] = Field(
        "fixed", description="fixed: flag score > threshold; quantile: threshold at the 1 - frr quantile of clean scores")
    threshold: Optional[float] = Field(None, description="the fixed threshold (default 0.5 on SPC, 2.0 standardised)")
    frr: float = Field(0.05, gt=0, lt=1, description="quantile rule: preset false rejection rate on clean inputs")
    batch_size: int = Field(1024, ge=1, description="amplified images per forward pass")
    accelerate: bool = Field(True, description="trace and freeze a channels_last copy of the model for inference (checked against eager)")

    # ------------------------------------------------------------------ state set by fit
    def _state(self) -> dict:
        st = getattr(self, "_fitted", None)
        if st is None:
            raise BackdoorLabError("SCALE-UP is not fitted: call fit(model, clean) first (clean may be None)")
        return st

    @property
    def fitted(self) -> bool:
        return getattr(self, "_fitted", None) is not None

    @property
    def decision_threshold(self) -> float:
        return self._state()["threshold"]

    def summary(self, result: DetectionResult) -> dict:
        st = self._state()
        return {"factors": list(self.factors), "standardise": self.standardise, "threshold_rule": self.threshold_rule,
                "spc_threshold": st["threshold"], "clean_spc_mean": st.get("clean_mean")}

    # ------------------------------------------------------------------ the family verbs
    def fit(self, model: nn.Module, clean: ImageSet | None) -> "ScaleUp":
        needs_clean = self.standardise or self.threshold_rule == "quantile"
        if clean is None and needs_clean:
            raise BackdoorLabError("SCALE-UP with standardise=True or threshold_rule=quantile needs clean images; give a "
                                   "clean set or use the vanilla detector (standardise=False, threshold_rule=fixed)")
        if clean is not None and not isinstance(clean, ImageSet):
            raise BackdoorLabError(f"SCALE-UP needs the clean set as an ImageSet; got {type(clean).__name__}")
        from backdoorlab.train import _memory_format, model_device

        shape = tuple(getattr(model, "input_shape", None) or (clean.shape if clean is not None else ()))
        probe = clean.float_batch(slice(0, 8)) if clean is not None else torch.rand(2, *shape) if shape else None
        device = model_device(model)
        st: dict = {"device": device, "format": _memory_format(model, True), "shape": shape or None,
                    "model": inference_model(model, probe.to(device), self.accelerate) if probe is not None else model.eval()}
        object.__setattr__(self, "_fitted", st)
        if clean is not None and len(clean):
            spc, pred = self._spc(st, clean.x)
            st["clean_mean"] = float(spc.mean())
            if self.standardise:
                st["stats"] = _class_stats(spc, pred, clean.num_classes)
            scores = self._standardised(st, spc, pred)
            if self.threshold_rule == "quantile":
                st["threshold"] = float(torch.quantile(scores.double(), 1.0 - self.frr))
        if "threshold" not in st:
            st["threshold"] = float(self.threshold if self.threshold is not None else (2.0 if self.standardise else 0.5))
        log.info("SCALE-UP fitted: threshold %.4f (%s%s)", st["threshold"], self.threshold_rule,
                 ", standardised" if self.standardise else "")
        return self

    def spc(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled prediction consistency (N,) in [0, 1]."""
        return self._spc(self._state(), self._check(x))[0]

    def score(self, x: torch.Tensor) -> torch.Tensor:
        st = self._state()
        spc, pred = self._spc(st, self._check(x))
        return self._standardised(st, spc, pred)

    def detect(self, x: torch.Tensor) -> DetectionResult:
        s = self.score(x)
        t = self.decision_threshold
        return DetectionResult(scores=s, flagged=s > t, threshold=t)

    # ------------------------------------------------------------------ the batched core
    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, ImageSet):
            x = x.x
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise BackdoorLabError(f"inputs must be a tensor (N, C, H, W); got {getattr(x, 'shape', type(x).__name__)}")
        shape = self._state()["shape"]
        if shape and tuple(x.shape[1:]) != tuple(shape):
            raise BackdoorLabError(f"inputs have images of shape {tuple(x.shape[1:])} but the model takes {tuple(shape)}")
        if x.dtype != torch.uint8 and x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
            raise BackdoorLabError("float inputs must lie in [0, 1] (or pass uint8 images 0..255)")
        return x

    def _standardised(self, st: dict, spc: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        if not self.standardise:
            return spc
        mu, sd = st["stats"]
        return (spc - mu[pred]) / sd[pred]

    @torch.inference_mode()
    def _spc(self, st: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(SPC (N,), prediction on x (N,))."""
        model, device, fmt = st["model"], st["device"], st["format"]
        f = torch.tensor((1.0, *map(float, self.factors)))
        m = f.numel()
        per = max(1, self.batch_size // m)
        n = x.shape[0]
        spc = torch.empty(n, dtype=torch.float32)
        pred = torch.empty(n, dtype=torch.long)
        for s in range(0, n, per):
            xb = x[s:s + per]
            xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
            amp = (xb[:, None] * f.view(1, m, 1, 1, 1)).clamp_(0.0, 1.0).flatten(0, 1)
            logits = model(amp.to(device).contiguous(memory_format=fmt)).float()
            if not torch.isfinite(logits).all():
                raise BackdoorLabError("the model produced NaN or infinite outputs on amplified inputs; check the model file")
            labels = logits.argmax(1).view(-1, m).cpu()
            pred[s:s + per] = labels[:, 0]
            spc[s:s + per] = (labels[:, 1:] == labels[:, :1]).float().mean(1)
        return spc, pred


def _class_stats(spc: torch.Tensor, pred: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per predicted class mean and std of clean SPC (pooled where a class has fewer than 2 images)."""
    mu0 = float(spc.mean())
    sd0 = max(float(spc.std()) if spc.numel() > 1 else 0.0, 1e-3)
    mu = torch.full((k,), mu0)
    sd = torch.full((k,), sd0)
    for c in range(k):
        v = spc[pred == c]
        if v.numel() >= 2:
            mu[c] = v.mean()
            sd[c] = max(float(v.std()), 1e-3)
    return mu, sd
