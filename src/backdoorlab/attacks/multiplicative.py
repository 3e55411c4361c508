"""Multiplicative trigger: every pixel is scaled, x' = clip(c * x).

Source: seed 002 (A. Borji, "Adversarial examples for backdoor detection", experiment III),
which poisons MNIST digits by "multiplying the digit image by 2"; not a method of its own paper.

Deviations, and why:
- pixel values live in [0, 1] and the product is clipped there (the seed leaves the range
  implicit); with c = 2 on MNIST the strokes saturate to white and look thicker.
- the seed reports the attack as weak (few triggered digits reach the target); it is kept for
  that reason, as a hard case for defenses, and its ASR is reported, not asserted.

Defaults (``DEFAULTS``; keys you set win): the seed's threat model, source-specific 8 -> 9 on 34%
of the 8s (the seed's 2,000 of ~5,850), c = 2; 10 epochs on digits, 12 on colour images. Weak by
nature, as the seed found: mnist5k seed 0 ASR 0.45 (CA 0.950 vs clean 0.969); its ASR is reported,
not held to a bar.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from backdoorlab.attacks import triggers
from backdoorlab.attacks.base import ATTACKS, Attack


@ATTACKS.register("multiplicative", "Every pixel scaled: x' = clip(c * x), c = 2 (seed 002)")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Multiplicative(Attack):
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "*": {"mode": "source-specific", "source": 8, "target": 9, "rate": 0.34, "factor": 2.0},
        "mnist": {"epochs": 10},
        "cifar10": {"epochs": 12},
    }
    factor: float = Field(2.0, gt=0.0, le=255.0, description="the factor c in x' = clip(c x)")

    def describe(self) -> str:
        return f"multiplicative(x {self.factor:g})"

    def apply_trigger(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return triggers.scale_clipped(x, self.factor)
