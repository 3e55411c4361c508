"""Metrics as pure functions over label / score tensors. Rates are fractions in [0, 1]."""

from __future__ import annotations

import torch

from backdoorlab.errors import BackdoorLabError


def _check_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise BackdoorLabError(f"{what}: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``pred == y``; NaN for empty input."""
    _check_same(pred, y, "accuracy")
    return float((pred == y).float().mean()) if y.numel() else float("nan")


def clean_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """CA: accuracy on clean test inputs."""
    return accuracy(pred, y)


def attack_success_rate(pred_triggered: torch.Tensor, y_target: torch.Tensor) -> float:
    """ASR: fraction of triggered inputs (which should not be the target) classified as the attacker's target."""
    return accuracy(pred_triggered, y_target)


def robust_accuracy(pred_triggered: torch.Tensor, y_true: torch.Tensor) -> float:
    """RA: fraction of triggered inputs still classified as their true class."""
    return accuracy(pred_triggered, y_true)


def defense_effectiveness_rating(ca_before: float, ca_after: float, asr_before: float, asr_after: float) -> float:
    """DER (BackdoorBench, Wu et al. 2022): [max(0, ΔASR) − max(0, ΔCA) + 1] / 2 in [0, 1],
    with ΔASR = ASR_before − ASR_after (drop in ASR, good) and ΔCA = CA_before − CA_after (drop in
    CA, bad). 1 = ASR removed at no cost; 0.5 = nothing changed; 0 = CA lost, ASR kept."""
    d_asr = asr_before - asr_after
    d_ca = ca_before - ca_after
    return (max(0.0, d_asr) - max(0.0, d_ca) + 1.0) / 2.0


def confusion(flagged: torch.Tensor, truth: torch.Tensor) -> tuple[int, int, int, int]:
    """(tp, fp, tn, fn) of a boolean detector."""
    _check_same(flagged, truth, "confusion")
    f, t = flagged.bool(), truth.bool()
    return int((f & t).sum()), int((f & ~t).sum()), int((~f & ~t).sum()), int((~f & t).sum())


def _rate(num: int, den: int) -> float:
    return num / den if den else float("nan")


def tpr(flagged: torch.Tensor, truth: torch.Tensor) -> float:
    """True positive rate (recall): flagged among the truly positive."""
    tp, _, _, fn = confusion(flagged, truth)
    return _rate(tp, tp + fn)


def fpr(flagged: torch.Tensor, truth: torch.Tensor) -> float:
    """False positive rate: flagged among the truly negative."""
    _, fp, tn, _ = confusion(flagged, truth)
    return _rate(fp, fp + tn)


def precision(flagged: torch.Tensor, truth: torch.Tensor) -> float:
    tp, fp, _, _ = confusion(flagged, truth)
    return _rate(tp, tp + fp)


def auroc(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """Area under the ROC curve (higher score = more positive), ties counted half
    (the Mann-Whitney U statistic). NaN when one class is absent."""
    _check_same(scores, truth, "auroc")
    s = scores.double().flatten()
    t = truth.bool().flatten()
    npos, nneg = int(t.sum()), int((~t).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    if not torch.isfinite(s).all():
        raise BackdoorLabError("auroc: scores contain NaN or infinity")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    sorted_s = s[order]
    # average ranks over ties
    uniq, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2.0
    ranks[order] = avg[inverse]
    u = ranks[t].sum() - npos * (npos + 1) / 2.0
    return float(u / (npos * nneg))


def roc_curve(scores: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fpr, tpr, thresholds) with thresholds descending; flag when score >= threshold."""
    s = scores.double().flatten()
    t = truth.bool().flatten()
    thr, inv = torch.unique(s, sorted=True, return_inverse=True)
    thr = thr.flip(0)
    pos = torch.zeros(thr.numel(), dtype=torch.float64)
    neg = torch.zeros(thr.numel(), dtype=torch.float64)
    idx = thr.numel() - 1 - inv
    pos.index_add_(0, idx, t.double())
    neg.index_add_(0, idx, (~t).double())
    tp = torch.cumsum(pos, 0)
    fp = torch.cumsum(neg, 0)
    P, N = max(1, int(t.sum())), max(1, int((~t).sum()))
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fp / N]), torch.cat([zero, tp / P]), torch.cat([torch.tensor([float("inf")], dtype=torch.float64), thr])


def frr(flagged_clean: torch.Tensor) -> float:
    """False rejection rate: clean inputs flagged as trojaned."""
    return float(flagged_clean.float().mean()) if flagged_clean.numel() else float("nan")


def far(flagged_trojaned: torch.Tensor) -> float:
    """False acceptance rate: trojaned inputs not flagged."""
    return float((~flagged_trojaned.bool()).float().mean()) if flagged_trojaned.numel() else float("nan")
