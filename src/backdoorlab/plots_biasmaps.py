"""Figures of the adversarial bias maps (seed 002), from a ``bias-maps`` :class:`InspectionResult`
(matplotlib, Agg backend); each function returns PNG bytes, only the runner and the CLI write them.

- :func:`bias_map_grid`: suspect | reference bias maps of every class for one input kind, one row
  pair per eps, titled with the share of images that fell in each class (seed figures 3-7);
- :func:`pair_grid`: the K x K (source, prediction) mean images, suspect and reference side by
  side (seed figures 9-12);
- :func:`distance_bars`: per-class distance between the suspect's and the reference's maps, with the
  flagged classes in red (seed figure 8);
- with the ``stamp`` statistic, the candidate stamps of every class (``stamps.png``, titled with
  the share each sends to its class) and that share per class (``class_stamp.png``);
- :func:`figures`: all of them for one result, keyed by file name.
"""

from __future__ import annotations

from typing import Sequence

import torch

from backdoorlab.plots import _plt, _show, _to_png


def bias_map_grid(rows: Sequence[dict], *, title: str = "", highlight: Sequence[int] = ()) -> bytes:
    """``rows``: one dict per eps with ``suspect`` (K, C, H, W), ``suspect_percent`` (K,) and
    optionally ``reference`` / ``reference_percent`` and ``eps``. Two image rows per entry (suspect
    above reference); a highlighted class's suspect title is red."""
    plt = _plt()
    pairs = [(r, "suspect") for r in rows] if all(r.get("reference") is None for r in rows) else \
        [(r, w) for r in rows for w in ("suspect", "reference")]
    k = rows[0]["suspect"].shape[0]
    fig, axes = plt.subplots(len(pairs), k, figsize=(1.05 * k + 0.9, 1.25 * len(pairs) + 0.5), squeeze=False)
    for i, (r, who) in enumerate(pairs):
        maps, pct = r[who], r[f"{who}_percent"]
        for c in range(k):
            ax = axes[i, c]
            _show(ax, maps[c])
            ax.set_title(f"{c}: {float(pct[c]):.1f}%", fontsize=7,
                         color="crimson" if (who == "suspect" and c in highlight) else "black")
        label = r.get("label", who) + (f"\neps {r['eps']:g}" if "eps" in r else "")
        axes[i, 0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _to_png(fig)


def _mosaic(grid: torch.Tensor, pad: int = 1) -> torch.Tensor:
    """(R, Q, C, H, W) images in [0, 1] -> one (C, R*(H+pad)-pad, Q*(W+pad)-pad) image, grey gaps."""
    r, q, c, h, w = grid.shape
    padded = torch.nn.functional.pad(grid.float().clamp(0, 1), (0, pad, 0, pad), value=0.5)
    tiled = padded.permute(2, 0, 3, 1, 4).reshape(c, r * (h + pad), q * (w + pad))
    return tiled[:, : r * (h + pad) - pad, : q * (w + pad) - pad]


def pair_grid(suspect: torch.Tensor, reference: torch.Tensor | None = None, *, title: str = "",
              highlight: Sequence[tuple[int, int]] = ()) -> bytes:
    """(K, K, C, H, W) mean images, rows = source, columns = predicted class (one mosaic per model);
    the reference's grid on the right when given. Highlighted (source, target) cells of the suspect
    get a red frame."""
    plt = _plt()
    k, _, c, h, w = suspect.shape
    grids = [("suspect", suspect)] + ([("reference", reference)] if reference is not None else [])
    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids) + 0.4, 4.6), squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids):
        _show(ax, _mosaic(grid))
        step_y, step_x = h + 1, w + 1
        ax.set_xticks([j * step_x + w / 2 - 0.5 for j in range(k)], [str(j) for j in range(k)], fontsize=7)
        ax.set_yticks([i * step_y + h / 2 - 0.5 for i in range(k)], [str(i) for i in range(k)], fontsize=7)
        ax.set_xlabel("predicted class", fontsize=8)
        ax.set_ylabel("source", fontsize=8)
        ax.set_title(name, fontsize=9)
        if name == "suspect":
            for s, t in highlight:
                ax.add_patch(plt.Rectangle((t * step_x - 0.5, s * step_y - 0.5), w, h, fill=False, ec="crimson", lw=1.5))
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _to_png(fig)


def distance_bars(distance: torch.Tensor, anomaly: torch.Tensor | None = None, *, flagged: Sequence[int] = (),
                  ylabel: str = "distance of bias maps", title: str = "") -> bytes:
    """Bar chart of a per-class distance (K,), flagged classes in red, anomaly indices on top."""
    plt = _plt()
    k = distance.numel()
    fig, ax = plt.subplots(figsize=(0.45 * k + 2.2, 3.0))
    colors = ["crimson" if c in flagged else "tab:blue" for c in range(k)]
    ax.bar(range(k), distance.double().numpy(), color=colors)
    if anomaly is not None:
        for c in range(k):
            a = float(anomaly[c])
            if a == a:
                ax.text(c, float(distance[c]), f"{a:.1f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(k))
    ax.set_xlabel("class")
    ax.set_ylabel(ylabel, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _to_png(fig)


def figures(result) -> dict[str, bytes]:
    """All bias-map figures of a ``bias-maps`` result: ``bias_maps_<kind>.png`` per input kind (one
    row pair per eps), ``pair_maps_<kind>_<eps>.png`` per setting with Algorithm II, and
    ``class_distance.png``."""
    d = result.details
    per = d["bias_maps"]
    out: dict[str, bytes] = {}
    kinds: dict[str, list[dict]] = {}
    for entry in per.values():
        kinds.setdefault(entry["kind"], []).append(entry)
    for kind, rows in kinds.items():
        out[f"bias_maps_{kind}.png"] = bias_map_grid(rows, highlight=result.flagged_targets,
                                                     title=f"Algorithm I bias maps, {kind} inputs")
        for r in rows:
            if r.get("pair_suspect") is not None:
                out[f"pair_maps_{kind}_{r['eps']:g}.png"] = pair_grid(
                    r["pair_suspect"], r.get("pair_reference"), highlight=result.flagged_pairs,
                    title=f"Algorithm II, {kind} inputs, eps {r['eps']:g}")
    other = "reference" if d.get("reference") == "model" else "median of others"
    statistic = d.get("statistic", "euclidean")
    if statistic == "stamp":
        out["class_distance.png"] = distance_bars(d["class_distance"], None, flagged=result.flagged_targets,
                                                  ylabel=f"||suspect - {other}||", title="per-class bias-map distance")
        rows = [{"suspect": e["stamp"], "suspect_percent": 100 * e["stamp_rate"], "eps": e["eps"], "label": e["kind"]}
                for e in per.values() if e.get("stamp") is not None]
        if rows:
            out["stamps.png"] = bias_map_grid(rows, highlight=result.flagged_targets,
                                              title="candidate stamps (largest map differences; grey: untouched) and the "
                                                    "extra share of clean images each sends to its class")
        out["class_stamp.png"] = distance_bars(
            d["class_statistic"], result.anomaly, flagged=result.flagged_targets,
            ylabel=f"share sent to the class\n(suspect - {'reference' if other == 'reference' else '0'})",
            title="stamp statistic per class (numbers: MAD anomaly index)")
        return out
    ylabel = f"||suspect - {other}||" if statistic == "euclidean" else f"local z-score vs {other}"
    out["class_distance.png"] = distance_bars(
        d["class_distance"], result.anomaly, flagged=result.flagged_targets, ylabel=ylabel,
        title="per-class bias-map distance (numbers: MAD anomaly index)")
    return out
