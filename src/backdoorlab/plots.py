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
