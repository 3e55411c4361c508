"""Figures of the defenses (matplotlib, Agg backend): each function returns PNG bytes; only the
runner and the CLI write them to disk.

- :func:`pruning_curve`: CA and ASR against the pruned fraction, pruning alone and with fine-tuning
  (seed 001 figure 5), from a :class:`~backdoorlab.defenses.RepairResult` curve.
- :func:`entropy_histogram`: STRIP entropy of clean vs trojaned (or flagged) inputs with the boundary.
"""

from __future__ import annotations

from typing import Sequence

import torch

from backdoorlab.plots import _plt, _to_png


def pruning_curve(curve: Sequence[dict[str, float]], *, chosen: float | None = None, title: str = "") -> bytes:
    """Accuracies (clean test, held-out, and ASR when present) against ``pruned_fraction``; solid
    lines for pruning alone (``finetuned`` = 0), dashed with markers for fine-tuned rows."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    styles = {"clean_accuracy": ("CA (clean test)", "tab:blue"), "attack_success_rate": ("ASR (triggered test)", "tab:red"),
              "holdout_accuracy": ("held-out accuracy", "tab:gray")}
    for tuned, ls, marker, suffix in ((0.0, "-", ".", "pruned"), (1.0, "--", "o", "fine-pruned")):
        rows = sorted((r for r in curve if r.get("finetuned", 0.0) == tuned), key=lambda r: r["pruned_fraction"])
        if not rows:
            continue
        x = [r["pruned_fraction"] for r in rows]
        for key, (label, color) in styles.items():
            if key == "holdout_accuracy" and (tuned or any("clean_accuracy" in r for r in rows)):
                continue  # held-out accuracy only when there is no test set (and never after tuning on it)
            if all(key in r for r in rows):
                ax.plot(x, [r[key] for r in rows], ls=ls, marker=marker, color=color, ms=4 if tuned else 3,
                        label=f"{label}, {suffix}")
    if chosen is not None:
        ax.axvline(chosen, color="k", lw=0.8, ls=":", label=f"chosen ({chosen:.2f})")
    ax.set_xlabel("fraction of channels pruned")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(-0.01, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _to_png(fig)


def entropy_histogram(clean: torch.Tensor, other: torch.Tensor, *, boundary: float | None = None,
                      labels: tuple[str, str] = ("clean", "trojaned"), title: str = "") -> bytes:
    """Overlaid histograms of STRIP entropies (bits) of two groups of inputs, with the boundary."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    a, b = clean.double().flatten().numpy(), other.double().flatten().numpy()
    hi = max([1e-6, *(v.max() for v in (a, b) if v.size)])
    bins = [hi * i / 50 for i in range(51)]
    if a.size:
        ax.hist(a, bins=bins, alpha=0.6, color="tab:blue", label=f"{labels[0]} ({a.size})", density=True)
    if b.size:
        ax.hist(b, bins=bins, alpha=0.6, color="tab:red", label=f"{labels[1]} ({b.size})", density=True)
    if boundary is not None:
        ax.axvline(boundary, color="k", ls="--", lw=1, label=f"boundary {boundary:.3f}")
    ax.set_xlabel("mean entropy of superimposed copies (bits)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _to_png(fig)


def repair_summary(agg: list) -> bytes | None:
    """ASR (and CA) before and after each repairing defense, one bar group per attack x defense
    (``agg``: the report's seed-averaged rows of repairing defenses)."""
    if not agg:
        return None
    plt = _plt()
    agg.sort(key=lambda r: (r.data, r.model, r.attack, r.defense))
    labels = [f"{r.attack}\n{r.defense}" + (f"\n{r.data}/{r.model}" if len({(x.data, x.model) for x in agg}) > 1 else "")
              for r in agg]
    xs = range(len(agg))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(agg) + 2), 3.6))
    w = 0.2
    series = [("CA before", "clean_accuracy_before", "#9ecae1"), ("CA after", "clean_accuracy", "#3182bd"),
              ("ASR before", "attack_success_rate_before", "#fdae6b"), ("ASR after", "attack_success_rate", "#e6550d")]
    for i, (name, key, color) in enumerate(series):
        ax.bar([x + (i - 1.5) * w for x in xs], [r.metrics.get(key, 0.0) for r in agg], w, label=name, color=color)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, 1.18))
    ax.grid(axis="y", alpha=0.3)
    return _to_png(fig)
