"""Losses and unlearning helpers of :mod:`backdoorlab.defenses.abl` (Anti-Backdoor Learning).

The LGA isolation loss, per-sample losses, the unlearning objectives and the pieces of the
unlearning loop; the method, its paper and its deviations are documented in ``abl``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backdoorlab.types import ImageSet


def lga_loss(logits: torch.Tensor, y: torch.Tensor, gamma: float, per_sample: bool) -> torch.Tensor:
    """The LGA loss ``sign(l - gamma) * l`` (a scalar): per sample then averaged, or on the batch mean.

    ``logits`` (B, K), ``y`` (B,) int64."""
    if per_sample:
        loss = F.cross_entropy(logits, y, reduction="none")
        return (torch.sign(loss - gamma) * loss).mean()
    loss = F.cross_entropy(logits, y)
    return torch.sign(loss - gamma) * loss


@torch.inference_mode()
def per_sample_loss(model: nn.Module, data: ImageSet, batch_size: int = 1024) -> torch.Tensor:
    """Cross-entropy of every sample of ``data`` under ``model`` (eval mode): float32 (N,), also
    when the forward pass runs under autocast."""
    from backdoorlab.train import predict_logits

    return F.cross_entropy(predict_logits(model, data.x, batch_size).float(), data.y, reduction="none")


def _accuracies(model: nn.Module, sets: dict[str, Any], batch_size: int) -> dict[str, float]:
    """Accuracy on each named image set; an entry that is an ``evaluate`` callback adds what it reports."""
    from backdoorlab.train import evaluate

    out: dict[str, float] = {}
    for k, d in sets.items():
        if d is None:
            continue
        if isinstance(d, ImageSet):
            if len(d):
                out[k] = evaluate(model, d, batch_size)
        else:
            out.update({n: float(v) for n, v in d(model).items()})
    return out


def unlearning_loss(logits: torch.Tensor, y: torch.Tensor, kind: str, bound: float | None = None) -> torch.Tensor:
    """Loss minimised on the isolated samples (a scalar): ``ce-ascent`` is ``-l`` (the paper), with
    each sample's ``l`` clamped at ``bound`` when given; ``unlikelihood`` is ``-log(1 - p_y)``."""
    if kind == "unlikelihood":
        # log(1 - p_y) = logsumexp of the other classes' log-probabilities: exact also where p_y
        # rounds to 1 in float32 (a confidently learned trigger), where log1p(-p_y) has no gradient
        logp = F.log_softmax(logits.float(), 1)
        others = logp.masked_fill(F.one_hot(y, logp.shape[1]).bool(), float("-inf"))
        return -torch.logsumexp(others, 1).mean()
    per = F.cross_entropy(logits, y, reduction="none")
    if bound is not None:
        per = per.clamp(max=bound)
    return -per.mean()


def _more_unlearned(m: dict[str, float], kept: dict[str, float], chance: float) -> bool:
    """``keep="unlearned"``: is epoch metrics ``m`` better to keep than ``kept``? The isolated samples'
    labels less predicted wins; once both are at or below chance level (unlearned), the better
    held-out accuracy wins (ties: the later epoch)."""
    a, b = m["isolated_accuracy"], kept["isolated_accuracy"]
    if a <= chance and b <= chance and "holdout_accuracy" in m:
        return m["holdout_accuracy"] >= kept["holdout_accuracy"]
    return a <= b


def _endless(loader):
    """Batches of ``loader``, epoch after epoch (a new permutation each time)."""
    while True:
        yield from loader
