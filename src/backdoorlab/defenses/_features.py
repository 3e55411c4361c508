"""Penultimate activations of any classifier, read from the model itself (for the cleansers).

The penultimate representation is the input of the model's last linear layer (the classifier
head): for a module tree (our architectures, any ``nn.Module``) a forward pre-hook on the last
``nn.Linear`` registered; for a ``torch.export`` program or a TorchScript model the input of the
last linear / addmm node of its graph (:class:`backdoorlab.defenses._surgery.Surgery`, which also
converts TorchScript to a graph); a model whose graph cannot be built gets one error naming the fix.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from backdoorlab.errors import BackdoorLabError

log = logging.getLogger(__name__)


class Penultimate:
    """``Penultimate(model, probe)(x) -> (features (B, D) float32, logits (B, K) float32)`` for float
    inputs in [0, 1]; ``probe`` a float batch of the model's inputs (to build a foreign model's graph)."""

    def __init__(self, model: nn.Module, probe: torch.Tensor) -> None:
        self.model = model
        self.tapped = None
        self.head: nn.Module | None = None
        if getattr(model, "format", None) in ("export", "torchscript"):
            from backdoorlab.defenses._surgery import Surgery

            try:
                surgery = Surgery(model, probe)
            except BackdoorLabError as exc:
                raise BackdoorLabError(f"the penultimate activations of this model cannot be read: {exc}; or leave out "
                                       "--model to train one on the training set") from None
            if surgery.penultimate is None:
                raise BackdoorLabError("the model's graph has no linear layer (linear / addmm) whose input could serve as "
                                       "the penultimate activations; these cleansers need a classifier head")
            self.tapped = surgery.tap([surgery.penultimate])
            return
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise BackdoorLabError(f"the model ({type(model).__name__}) has no nn.Linear layer; the cleansers read the "
                                   "input of the last linear layer (the classifier head) as the penultimate activations")
        self.head = linears[-1]

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tapped is not None:
            logits, (feats,) = self.tapped(x)
            return feats.float().flatten(1), logits.float()
        got: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda _m, inp: got.append(inp[0].detach()))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if not got:
            raise BackdoorLabError("the model's last nn.Linear layer was not called in its forward pass; "
                                   "the cleansers need a model whose last linear layer is its classifier head")
        return got[-1].float().flatten(1), logits.float()


def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, predictions (N,) int64) of uint8 or float [0, 1] images ``x`` (N, C, H, W)."""
    from backdoorlab.train import _memory_format, model_device

    was = model.training
    model.eval()
    device = model_device(model)
    fmt = _memory_format(model, True)
    if x.shape[0] == 0:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    probe = x[:2].float().div(255.0) if x.dtype == torch.uint8 else x[:2].float()
    reader = Penultimate(model, probe.to(device))
    feats, preds = [], []
    try:
        for s in range(0, x.shape[0], batch_size):
            xb = x[s:s + batch_size]
            xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
            f, logits = reader(xb.to(device).contiguous(memory_format=fmt))
            feats.append(f.cpu())
            preds.append(logits.argmax(1).cpu())
    finally:
        model.train(was)
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    out = torch.cat(feats)
    if not torch.isfinite(out).all():
        raise BackdoorLabError("the model produced NaN or infinite penultimate activations; check the model file and "
                               "input range [0, 1]")
    return out, torch.cat(preds)


def class_groups(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Indices of each class (sorted), one tensor per class."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    return list(torch.split(order, counts))


def segmented_features(model: nn.Module, data, clean=None, *, segment: str = "label", batch_size: int = 512):
    """What the cleansers work on: penultimate features (N, D) of the training set, the class of each
    sample used to segment it (its label, or the model's prediction with ``segment="prediction"``),
    and the clean set's features and labels (None without a clean set)."""
    from backdoorlab.defenses.common import check_model_matches

    check_model_matches(model, data)
    feats, preds = penultimate_features(model, data.x, batch_size)
    seg = data.y.clone() if segment == "label" else preds
    cf = cy = None
    if clean is not None and len(clean):
        cf, _ = penultimate_features(model, clean.x, batch_size)
        cy = clean.y.clone()
    return feats, seg, cf, cy


def quota_flags(scores: torch.Tensor, groups: list[torch.Tensor], share: float,
                threshold: float | None = None) -> tuple[torch.Tensor, float]:
    """(flags, threshold): the ``ceil(share * n_c)`` highest scores of every group (Tran et al.'s removal
    rule; threshold NaN), or the scores above ``threshold`` when one is given."""
    import math

    if threshold is not None:
        return scores > threshold, float(threshold)
    flagged = torch.zeros(scores.numel(), dtype=torch.bool)
    for idx in groups:
        k = min(idx.numel(), int(math.ceil(share * idx.numel())))
        if k:
            flagged[idx[torch.topk(scores[idx], k).indices]] = True
    return flagged, float("nan")
