"""Matplotlib figures (Agg backend) from result objects. Each function returns PNG bytes;
only the runner and CLI write them to disk."""

from __future__ import annotations

import io
from typing import Sequence

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _show(ax, img: torch.Tensor) -> None:
    """``img`` uint8 or float (C, H, W)."""
    x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    if x.shape[0] == 1:
        ax.imshow(x[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(x.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def sample_grid(
    clean: torch.Tensor, poisoned: torch.Tensor, clean_labels: Sequence[int], poisoned_labels: Sequence[int],
    class_names: Sequence[str] = (), title: str = "",
) -> bytes:
    """Two rows: clean images with their labels above the same images poisoned, with the labels
    they were given. ``clean``/``poisoned``: (n, C, H, W)."""
    plt = _plt()
    n = clean.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.3 * n + 0.6, 3.0), squeeze=False)
    name = (lambda c: class_names[c] if class_names and c < len(class_names) else str(c))
    for i in range(n):
        _show(axes[0, i], clean[i])
        axes[0, i].set_title(f"{name(int(clean_labels[i]))}", fontsize=8)
        _show(axes[1, i], poisoned[i])
        axes[1, i].set_title(f"-> {name(int(poisoned_labels[i]))}", fontsize=8, color="crimson")
    axes[0, 0].set_ylabel("clean", fontsize=9)
    axes[1, 0].set_ylabel("poisoned", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _to_png(fig)


def trigger_grid(clean: torch.Tensor, triggered: torch.Tensor, title: str = "") -> bytes:
    """Three rows: clean images, the same images triggered, and the trigger itself
    (|triggered - clean|, scaled by its largest value over all images), e.g. to show that an input-aware
    attack gives every image its own trigger. ``clean``/``triggered``: (n, C, H, W) uint8 or float."""
    plt = _plt()
    c = clean.float() / 255.0 if clean.dtype == torch.uint8 else clean.float()
    t = triggered.float() / 255.0 if triggered.dtype == torch.uint8 else triggered.float()
    diff = (t - c).abs()
    diff = diff / diff.max().clamp_min(1e-8)
    n = c.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.3 * n + 0.6, 4.2), squeeze=False)
    for i in range(n):
        _show(axes[0, i], c[i])
        _show(axes[1, i], t[i])
        _show(axes[2, i], diff[i])
    for r, label in enumerate(("clean", "triggered", "trigger")):
        axes[r, 0].set_ylabel(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _to_png(fig)


def training_curves(epochs: Sequence[dict], title: str = "") -> bytes:
    """Loss and training accuracy per epoch (from :class:`backdoorlab.train.History`)."""
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(7, 2.6))
    e = [d["epoch"] for d in epochs]
    ax[0].plot(e, [d["loss"] for d in epochs], marker="o")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("training loss")
    ax[1].plot(e, [d["train_accuracy"] for d in epochs], marker="o")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("training accuracy")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _to_png(fig)


def pattern_grid(patterns: torch.Tensor, normalise: bool = False, title: str = "",
                 highlight: Sequence[tuple[int, int]] = ()) -> bytes:
    """K x K grid of estimated patterns (K, K, C, H, W): rows = source, columns = target.

    Raw: each pattern's positive part on a common [0, max] scale (seed 000 figure 2).
    Normalised: each pattern min-max scaled on its own (seed figure 3). Flagged pairs framed red.
    The patterns are tiled into one mosaic shown by one ``imshow`` (one axis per pattern took 73 s
    for the 1,806 pairs of a 43-class model; the mosaic takes about a second at any K).
    """
    plt = _plt()
    from matplotlib.patches import Rectangle

    k, _, c, h, w = patterns.shape
    p = patterns.float()
    if normalise:
        flat = p.flatten(2)
        lo, hi = flat.amin(2), flat.amax(2)
        p = (p - lo[..., None, None, None]) / (hi - lo).clamp_min(1e-12)[..., None, None, None]
    else:
        p = p.clamp(min=0) / (float(p.clamp(min=0).max()) or 1.0)
    gap = max(1, h // 8)
    # background: mid grey for the gaps, the diagonal (no pattern) white
    mosaic = torch.full((c, k * (h + gap) + gap, k * (w + gap) + gap), 0.5)
    for s in range(k):
        for t in range(k):
            y, x = gap + s * (h + gap), gap + t * (w + gap)
            mosaic[:, y:y + h, x:x + w] = 1.0 if s == t else p[s, t]
    side = min(max(7.0, mosaic.shape[-1] / 90), 20.0)  # about one screen pixel per pattern pixel at large K
    fig, ax = plt.subplots(figsize=(side, side))
    img = mosaic[0] if c == 1 else mosaic.permute(1, 2, 0)
    ax.imshow(img.numpy(), cmap="gray" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    centres = [gap + i * (h + gap) + (h - 1) / 2 for i in range(k)]
    step = 1 if k <= 20 else 5
    shown = list(range(0, k, step))
    ax.set_xticks([centres[i] for i in shown], [f"t={i}" if k <= 20 else str(i) for i in shown], fontsize=7)
    ax.set_yticks([centres[i] for i in shown], [f"s={i}" if k <= 20 else str(i) for i in shown], fontsize=7)
    ax.xaxis.tick_top()
    if k > 20:
        ax.set_xlabel("target")
        ax.set_ylabel("source")
    for s, t in highlight:
        ax.add_patch(Rectangle((gap + t * (w + gap) - 1, gap + s * (h + gap) - 1), w + 1, h + 1,
                               fill=False, edgecolor="red", linewidth=2.0))
    ax.set_title(title or ("normalised patterns" if normalise else "estimated patterns") + " (row: source, column: target)",
                 fontsize=9)
    return _to_png(fig)


def pair_scatter(scores: torch.Tensor, flagged: Sequence[tuple[int, int]] = (), ylabel: str = "d(v)",
                 title: str = "") -> bytes:
    """Scatter of a (K, K) per-pair statistic against the pair index (seed 000 figure 4)."""
    plt = _plt()
    k = scores.shape[0]
    fig, ax = plt.subplots(figsize=(7, 3))
    xs, ys, labels = [], [], []
    for s in range(k):
        for t in range(k):
            if s != t and torch.isfinite(scores[s, t]):
                xs.append(len(xs))
                ys.append(float(scores[s, t]))
                labels.append((s, t))
    colors = ["crimson" if st in flagged else "tab:blue" for st in labels]
    ax.scatter(xs, ys, c=colors, s=14)
    for x, y, st in zip(xs, ys, labels):
        if st in flagged:
            ax.annotate(f"{st[0]}->{st[1]}", (x, y), fontsize=8, color="crimson", xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("(source, target) pair index: s*K + t order")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "per-pair statistic (flagged in red)", fontsize=9)
    fig.tight_layout()
    return _to_png(fig)


def compare_images(images: Sequence[torch.Tensor], titles: Sequence[str], title: str = "") -> bytes:
    """A row of images (each (C, H, W) float, any range: min-max scaled), e.g. estimated vs true trigger."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(images), figsize=(2.2 * len(images), 2.4), squeeze=False)
    for ax, img, tt in zip(axes[0], images, titles):
        p = img.float()
        p = (p - p.min()) / (p.max() - p.min()).clamp_min(1e-12)
        _show(ax, p)
        ax.set_title(tt, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _to_png(fig)


def score_histogram(scores: torch.Tensor, threshold: float | None = None, truth: torch.Tensor | None = None,
                    xlabel: str = "score", title: str = "", bins: int = 50) -> bytes:
    """Histogram of per-sample scores (split by ground truth when given), with the threshold."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3))
    s = scores.float()
    if truth is not None:
        ax.hist(s[~truth.bool()].numpy(), bins=bins, alpha=0.7, label="clean", log=True)
        ax.hist(s[truth.bool()].numpy(), bins=bins, alpha=0.7, label="poisoned", log=True, color="crimson")
        ax.legend(fontsize=8)
    else:
        ax.hist(s.numpy(), bins=bins, log=True)
    if threshold is not None and threshold == threshold:
        ax.axvline(threshold, color="black", ls="--", lw=1)
        ax.annotate(f"threshold {threshold:.3g}", (threshold, ax.get_ylim()[1]), fontsize=8, xytext=(4, -12),
                    textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples (log)")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _to_png(fig)
