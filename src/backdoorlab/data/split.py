"""Stratified, seeded splits (vectorised: one permutation and one sort, no per-class loop)."""

from __future__ import annotations

import torch

from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet, Splits


def stratified_indices(y: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices so that each class gives ``round(fraction * count)`` samples to the second part.

    Returns ``(rest, part)``, both sorted ascending. Order within a class is random (seeded).
    """
    if not 0.0 <= fraction <= 1.0:
        raise BackdoorLabError(f"split fraction must lie in [0, 1]; got {fraction}")
    n = y.numel()
    perm = torch.randperm(n, generator=generator)
    ys = y[perm]
    order = torch.sort(ys, stable=True).indices
    sorted_idx = perm[order]
    sorted_y = ys[order]
    counts = torch.bincount(sorted_y)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[sorted_y]
    take = torch.round(counts.double() * fraction).long()
    in_part = rank < take[sorted_y]
    return sorted_idx[~in_part].sort().values, sorted_idx[in_part].sort().values


def stratified_subsample(data: ImageSet, size: int, generator: torch.Generator) -> ImageSet:
    """Keep about ``size`` samples, in the class proportions of ``data``."""
    if size <= 0:
        raise BackdoorLabError(f"subsample size must be positive; got {size}")
    if size >= len(data):
        return data
    _, keep = stratified_indices(data.y, size / len(data), generator)
    return data.subset(keep)


def make_splits(
    train: ImageSet,
    test: ImageSet | None,
    *,
    seed: int,
    test_fraction: float = 0.2,
    holdout_fraction: float = 0.05,
    train_size: int | None = None,
    test_size: int | None = None,
) -> Splits:
    """Train / test / clean-holdout split.

    When the source has no test set, ``test_fraction`` of it (per class) becomes the test set.
    ``holdout_fraction`` of the training part (per class, 5% by default as in BackdoorBench) is set
    aside clean for defenses. ``train_size`` / ``test_size`` subsample (stratified) for quick runs.
    """
    g = torch.Generator().manual_seed(seed)
    if test is None:
        if not 0.0 < test_fraction < 1.0:
            raise BackdoorLabError(f"data.test_fraction must lie in (0, 1); got {test_fraction}")
        rest, part = stratified_indices(train.y, test_fraction, g)
        train, test = train.subset(rest), train.subset(part, name=f"{train.name}-test")
    if test.shape != train.shape:
        raise BackdoorLabError(f"test images {test.shape} differ in shape from train images {train.shape}")
    if train_size is not None:
        train = stratified_subsample(train, int(train_size / max(1e-9, 1 - holdout_fraction)), g)
    if test_size is not None:
        test = stratified_subsample(test, test_size, g)
    if not 0.0 <= holdout_fraction < 1.0:
        raise BackdoorLabError(f"data.holdout_fraction must lie in [0, 1); got {holdout_fraction}")
    rest, hold = stratified_indices(train.y, holdout_fraction, g)
    return Splits(train.subset(rest), test, train.subset(hold, name=f"{train.name}-holdout"))
