"""Figures of Anti-Backdoor Learning (matplotlib, Agg backend); each function returns PNG bytes.

- :func:`loss_traces`: per-sample training loss of clean vs poisoned samples over the isolation
  epochs (median, 10-90% band and a few single samples per group; log scale), with the LGA floor
  gamma: the picture that explains ABL (backdoor samples sink below gamma, clean ones hover at it).
"""

from __future__ import annotations

import torch

from backdoorlab.plots import _plt, _to_png

_FLOOR = 1e-6  # losses are drawn on a log axis


def loss_traces(traces: torch.Tensor, groups: torch.Tensor, *, gamma: float | None = None,
                labels: tuple[str, str] = ("clean samples", "poisoned samples"), singles: int = 12,
                seed: int = 0, title: str = "") -> bytes:
    """``traces`` float (T, N): each sample's loss after each of T isolation epochs; ``groups`` (N,)
    bool: True for the second group (poisoned samples when the ground truth is known, else the
    isolated ones). Draws, per group, the median loss, its 10-90% band and ``singles`` thin single
    sample curves drawn at random (seeded)."""
    if traces.dim() != 2 or groups.shape != (traces.shape[1],):
        raise ValueError(f"traces must be (T, N) and groups (N,); got {tuple(traces.shape)} and {tuple(groups.shape)}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    t = traces.double().clamp_min(_FLOOR)
    epochs = torch.arange(1, t.shape[0] + 1).numpy()
    g = torch.Generator().manual_seed(seed)
    for member, label, color in ((False, labels[0], "tab:blue"), (True, labels[1], "tab:red")):
        idx = torch.nonzero(groups == member).flatten()
        if idx.numel() == 0:
            continue
        sub = t[:, idx]
        q = torch.quantile(sub, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), dim=1)
        ax.fill_between(epochs, q[0].numpy(), q[2].numpy(), color=color, alpha=0.15, lw=0)
        ax.plot(epochs, q[1].numpy(), color=color, lw=2, marker="o", ms=3, label=f"{label} ({idx.numel()}): median, 10-90%")
        pick = idx[torch.randperm(idx.numel(), generator=g)[:singles]]
        for i in pick.tolist():
            ax.plot(epochs, t[:, i].numpy(), color=color, lw=0.5, alpha=0.35)
    if gamma is not None:
        ax.axhline(gamma, color="k", ls="--", lw=1, label=f"gamma {gamma:g}")
    ax.set_yscale("log")
    ax.set_xlabel("isolation epoch (LGA)")
    ax.set_ylabel("per-sample training loss")
    ax.set_xticks(epochs)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower left")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _to_png(fig)
