"""Data containers shared by every module.

Images stay ``uint8`` (N, C, H, W) in memory (all of CIFAR-10 is 184 MB that way) and become
float in [0, 1] one batch at a time (:meth:`ImageSet.float_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from backdoorlab.errors import BackdoorLabError


def _check_images(x: torch.Tensor, y: torch.Tensor, num_classes: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
        got = f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
        raise BackdoorLabError(f"{what}: images must be a uint8 tensor (N, C, H, W); got {got}")
    if x.shape[1] not in (1, 3):
        raise BackdoorLabError(
            f"{what}: images must have 1 or 3 channels in dim 1 (N, C, H, W); got shape {tuple(x.shape)}"
        )
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise BackdoorLabError(
            f"{what}: labels must be a 1-D tensor with one label per image ({x.shape[0]}); "
            f"got shape {tuple(getattr(y, 'shape', ()))}"
        )
    if y.dtype != torch.int64:
        raise BackdoorLabError(f"{what}: labels must be int64; got {y.dtype}")
    if num_classes < 2:
        raise BackdoorLabError(f"{what}: need at least 2 classes; got {num_classes}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise BackdoorLabError(
            f"{what}: labels must lie in 0..{num_classes - 1}; got {int(y.min())}..{int(y.max())}"
        )


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A labelled image set: ``x`` uint8 (N, C, H, W), ``y`` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...] = ()
    name: str = "data"

    def __post_init__(self) -> None:
        _check_images(self.x, self.y, self.num_classes, self.name)
        if not self.class_names:
            object.__setattr__(self, "class_names", tuple(str(i) for i in range(self.num_classes)))
        elif len(self.class_names) != self.num_classes:
            raise BackdoorLabError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    def float_batch(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images (optionally a subset) as float32 in [0, 1]."""
        x = self.x if index is None else self.x[index]
        return x.float().div_(255.0)

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.y, minlength=self.num_classes)

    def subset(self, index: torch.Tensor, name: str | None = None) -> "ImageSet":
        return ImageSet(self.x[index], self.y[index], self.num_classes, self.class_names, name or self.name)


@dataclass(frozen=True, eq=False)
class PoisonedSet(ImageSet):
    """An :class:`ImageSet` with the ground truth of a poisoning attack.

    ``is_poison`` (N,) bool marks stamped samples; ``y_source`` (N,) int64 holds each sample's
    true class before relabelling. Metrics read these; defenses never do.
    """

    is_poison: torch.Tensor = field(default=None)  # type: ignore[assignment]
    y_source: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        n = len(self)
        if self.is_poison is None or self.is_poison.dtype != torch.bool or tuple(self.is_poison.shape) != (n,):
            raise BackdoorLabError(f"{self.name}: is_poison must be a bool tensor of shape ({n},)")
        if self.y_source is None or self.y_source.dtype != torch.int64 or tuple(self.y_source.shape) != (n,):
            raise BackdoorLabError(f"{self.name}: y_source must be an int64 tensor of shape ({n},)")

    def subset(self, index: torch.Tensor, name: str | None = None) -> "PoisonedSet":
        return PoisonedSet(
            self.x[index], self.y[index], self.num_classes, self.class_names, name or self.name,
            is_poison=self.is_poison[index], y_source=self.y_source[index],
        )

    def without_ground_truth(self) -> ImageSet:
        """What a defender sees: the (possibly relabelled, stamped) images and labels only."""
        return ImageSet(self.x, self.y, self.num_classes, self.class_names, self.name)


@dataclass(frozen=True, eq=False)
class Splits:
    """Train / test / clean held-out split of one data set (the held-out set is for defenses)."""

    train: ImageSet
    test: ImageSet
    holdout: ImageSet

    def summary(self) -> dict[str, int]:
        return {"train": len(self.train), "test": len(self.test), "holdout": len(self.holdout)}


def class_names_or_default(names: Sequence[str] | None, k: int) -> tuple[str, ...]:
    return tuple(str(n) for n in names) if names is not None and len(names) == k else tuple(str(i) for i in range(k))
