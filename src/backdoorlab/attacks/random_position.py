"""Random-position patch that avoids the object: the patch lands at a random place per image,
chosen among the places where the patch area is darkest (the blank background of a digit).

Source: seed 002 (A. Borji, "Adversarial examples for backdoor detection", experiment II):
"I will choose random locations to place the patch. Attempts were made not to occlude the
digits (i.e. blank regions were selected)." The patch itself is BadNets' (Gu et al. 2017).

Deviations, and why:
- "blank" is made precise: every window whose mean intensity (over channels) lies within
  ``tolerance`` of the darkest window of that image is a candidate; one candidate is drawn
  uniformly per image. On MNIST (exact-zero background) with tolerance 0 that is every window that
  does not touch the digit; on natural images it is the darkest area (few candidates).
- the seed's C-shaped patch is not specified beyond its look; we offer the square and ball
  patches of :mod:`backdoorlab.attacks.badnets` (pixel value ``value`` in [0, 1]).
- positions are drawn afresh for the training and the test set (the trigger is the patch, not
  its place), from the generator the runner seeds.

Defaults (``DEFAULTS``; keys you set win): seed 002's setting on digits (a 5x5 patch on 20% of the
non-target samples, all-to-one -> 0, tolerance 0: never on the digit), 10 epochs; on colour images a
3x3 patch on 10% in the darkest area (tolerance 0.05), 12 epochs.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from backdoorlab.attacks import triggers
from backdoorlab.attacks.base import ATTACKS, Attack
from backdoorlab.errors import BackdoorLabError


@ATTACKS.register("random-position", "Patch at a random place per image among the darkest (blank) areas, avoiding the digit (seed 002)")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class RandomPosition(Attack):
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "*": {"mode": "all-to-one", "target": 0},
        "mnist": {"rate": 0.2, "size": 5, "tolerance": 0.0, "epochs": 10},
        "cifar10": {"rate": 0.1, "size": 3, "tolerance": 0.05, "epochs": 12},
    }
    shape: Literal["square", "ball"] = "square"
    size: int = Field(3, ge=1, description="patch side in pixels")
    value: float = Field(1.0, ge=0.0, le=1.0, description="patch pixel value")
    tolerance: float = Field(0.0, ge=0.0, le=1.0, description="candidate windows: mean intensity <= darkest + tolerance")

    def describe(self) -> str:
        return f"random-position({self.shape} {self.size}x{self.size}, avoiding the object)"

    def check_image_shape(self, shape: tuple[int, int, int]) -> None:
        _, h, w = shape
        if self.size > h or self.size > w:
            raise BackdoorLabError(f"the {self.size}x{self.size} patch does not fit images of {h}x{w}; choose a smaller attack.size")

    def positions(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-left (row, col) of the patch per image, int64 (B,) each."""
        self.check_image_shape(tuple(x.shape[1:]))
        means = triggers.window_means(x, self.size)  # (B, h', w')
        b, hh, ww = means.shape
        flat = means.reshape(b, -1)
        ok = flat <= flat.min(1, keepdim=True).values + self.tolerance + 1e-6
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        score = torch.rand(flat.shape, generator=g).masked_fill_(~ok, -1.0)  # uniform among candidates
        pick = score.argmax(1)
        return pick // ww, pick % ww

    def apply_trigger(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        top, left = self.positions(x, generator)
        mask = triggers.ball_mask(self.size) if self.shape == "ball" else triggers.square_mask(self.size)
        return triggers.stamp(x, torch.full((1, self.size, self.size), self.value), mask, top, left)
