"""``backdoorlab data NAME``: look at a data set before using it.

Loads the source ``NAME`` of the data registry with the ``--set key=value`` parameters (``path``,
``full``, ``cache``, ...), prints the split sizes, image shape, class names and per-class counts,
and writes a grid of samples (a row per class, at most 16 classes x 8 images) as a PNG. The grid goes
to ``--figures DIR`` when given, else to ``<cache folder>/figures/`` (``$BACKDOORLAB_CACHE`` or
``~/.cache/backdoorlab``), so the working folder is never littered. ``--json`` prints
``{num_train, num_test, shape, classes, counts, seconds, figure}``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import List, Optional

import torch
import typer

from backdoorlab.cli.common import JsonOpt, handles_errors, method_params, out, print_json, setup_logging
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

_ROWS, _COLS = 16, 8


def class_samples_grid(data: ImageSet, title: str = "", per_class: int = _COLS, max_classes: int = _ROWS) -> bytes:
    """PNG bytes: a row of the first ``per_class`` images of each of the first ``max_classes`` classes."""
    from backdoorlab.plots import _plt, _show, _to_png

    plt = _plt()
    k = min(data.num_classes, max_classes)
    y = data.y[: min(len(data), 200_000)]
    order = torch.argsort(y, stable=True)  # indices grouped by class, in data order within a class
    starts = torch.searchsorted(y[order], torch.arange(k))
    counts = torch.bincount(y, minlength=data.num_classes)[:k]
    fig, axes = plt.subplots(k, per_class, figsize=(0.8 * per_class + 1.2, 0.8 * k + 0.6), squeeze=False)
    for r in range(k):
        for c in range(per_class):
            ax = axes[r, c]
            if c < int(counts[r]):
                _show(ax, data.x[int(order[int(starts[r]) + c])])
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(data.class_names[r][:14], fontsize=8, rotation=0, ha="right", va="center")
    fig.subplots_adjust(wspace=0.06, hspace=0.06)
    if title:
        fig.suptitle(title, fontsize=10, y=0.92)
    return _to_png(fig)


def describe(name: str, params: dict) -> tuple[dict, ImageSet]:
    """The summary of data source ``name`` and its train set (for the grid)."""
    from backdoorlab.data.sources import DATASETS

    t0 = time.perf_counter()
    raw = DATASETS.build(name, params, where="data")
    seconds = time.perf_counter() - t0
    tr, te = raw.train, raw.test
    counts = {"train": torch.bincount(tr.y, minlength=tr.num_classes).tolist()}
    if te is not None:
        counts["test"] = torch.bincount(te.y, minlength=tr.num_classes).tolist()
    summary = {"name": name, "num_train": len(tr), "num_test": len(te) if te is not None else 0,
               "shape": list(tr.shape), "classes": list(tr.class_names), "counts": counts,
               "seconds": round(seconds, 3)}
    return summary, tr


@handles_errors
def data(
    name: str = typer.Argument(..., help="a data source of the registry (`backdoorlab list`), e.g. cifar10, parquet, npz"),
    set_: List[str] = typer.Option([], "--set", help="a source parameter, e.g. --set path=data/ --set full=true (repeatable)"),
    figures: Optional[Path] = typer.Option(None, "--figures", help="folder for the sample grid (default: <cache>/figures)"),
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log to stderr"),
) -> None:
    """Show a data set: split sizes, image shape, classes and counts; write a grid of samples."""
    from rich.table import Table

    from backdoorlab.atomic import atomic_write_bytes
    from backdoorlab.data.parquet import default_cache_dir

    setup_logging(verbose)
    params = method_params(set_, option="--set", example="path=data/")
    summary, train = describe(name, params)
    folder = figures if figures is not None else default_cache_dir() / "figures"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join([name] + [f"{k}-{v}" for k, v in sorted(params.items())]))[:120]
    fig_path = folder / f"{stem}-samples.png"
    try:
        atomic_write_bytes(fig_path, class_samples_grid(train, title=f"{name}: {len(train)} training images"))
    except OSError as exc:
        raise BackdoorLabError(f"cannot write the sample grid to {fig_path} ({exc}); give --figures DIR") from None
    summary["figure"] = str(fig_path)
    if as_json:
        print_json(summary)
        return
    out.print(f"{name}: {summary['num_train']} train, {summary['num_test']} test images of shape "
              f"{tuple(summary['shape'])} (C, H, W); loaded in {summary['seconds']:.2f} s")
    t = Table(title=f"{name}: {len(summary['classes'])} classes")
    t.add_column("label", justify="right")
    t.add_column("class")
    t.add_column("train", justify="right")
    if "test" in summary["counts"]:
        t.add_column("test", justify="right")
    for i, cname in enumerate(summary["classes"]):
        row = [str(i), cname, str(summary["counts"]["train"][i])]
        if "test" in summary["counts"]:
            row.append(str(summary["counts"]["test"][i]))
        t.add_row(*row)
    out.print(t)
    out.print(f"wrote samples: {fig_path}")
