"""In-memory batch loader with whole-batch augmentation.

A randperm over the uint8 tensors, batches sliced and turned into float in [0, 1], and the
augmentations (random crop with zero padding, horizontal flip) applied to the whole batch at
once with tensor indexing. No ``Dataset`` subclass, no worker processes, no PIL round trips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from backdoorlab.errors import BackdoorLabError


@dataclass(frozen=True)
class Augment:
    """Batch augmentation: random crop after ``crop_padding`` zero pixels, horizontal flip."""

    crop_padding: int = 0
    flip: bool = False

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x`` float (B, C, H, W) -> augmented copy, same shape."""
        if self.crop_padding > 0:
            x = random_crop(x, self.crop_padding, generator)
        if self.flip:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad by ``padding`` zeros and crop back to (H, W) at a random offset per image."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    rows = (top[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (left[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    bi = torch.arange(b)[:, None, None]
    out = padded[bi, :, rows, cols]  # (B, H, W, C): advanced dims first
    return out.permute(0, 3, 1, 2)  # (B, C, H, W) view in channels_last layout: what the models train in


class TensorLoader:
    """Iterate float batches ``(x, y)`` over in-memory uint8 images.

    ``x``: uint8 (N, C, H, W); ``y``: int64 (N,). Each epoch draws a new permutation from
    ``generator`` (deterministic under a seed). ``transform`` (optional) maps a float batch and its
    labels and indices to new ones (used by training-time attacks); it runs after the augmentation,
    or before it with ``transform_first`` (then its output is augmented like any training image).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int = 128,
        *,
        shuffle: bool = True,
        augment: Augment | None = None,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        transform: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        transform_first: bool = False,
    ) -> None:
        if x.shape[0] != y.shape[0]:
            raise BackdoorLabError(f"loader: {x.shape[0]} images but {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise BackdoorLabError("loader: no samples to iterate over")
        if batch_size < 1:
            raise BackdoorLabError(f"batch_size must be >= 1; got {batch_size}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment if augment is not None and augment.active else None
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.drop_last = drop_last
        self.transform = transform
        self.transform_first = transform_first

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.x.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            xb = self.x[idx].float().div_(255.0)
            yb = self.y[idx]
            if self.transform is not None and self.transform_first:
                xb, yb = self.transform(xb, yb, idx)
            if self.augment is not None:
                xb = self.augment(xb, self.generator)
            if self.transform is not None and not self.transform_first:
                xb, yb = self.transform(xb, yb, idx)
            yield xb, yb
