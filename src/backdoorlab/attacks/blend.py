"""Blend: the whole image is mixed with a key image.

Paper: X. Chen, C. Liu, B. Li, K. Lu, D. Song, "Targeted Backdoor Attacks on Deep Learning
Systems Using Data Poisoning", 2017 (arXiv:1712.05526), the blended injection strategy:
x' = (1 - alpha) x + alpha k, with k a fixed random-noise image or a given image ("Hello Kitty").
Seed 002 (Borji, experiment III) blends each source image with a randomly selected image of the
target class, x' = I_source + 0.1 I_target.

Keys (``key``):
- ``noise``: a fixed uniform random image, drawn from ``key_seed`` at the data's size;
- ``kitty``: a cartoon cat face drawn in code (pink background, white head, black eyes, red bow),
  our stand-in for Chen et al.'s Hello Kitty photo, which we do not ship;
- ``image``: any image file (PNG/JPEG/.npy), resized (bilinear) to the data's H x W. A grey key
  is used on every channel of colour data; a colour key on grey data is rejected (give a grey
  image): we do not guess a colour-to-grey conversion;
- ``target-sample``: seed 002's key, a new randomly chosen image of the class each sample is
  relabelled to (the target class), drawn per sample from the data set being stamped (the
  training set when poisoning, the test set for ASR). It needs the data, so it has no
  data-free ``apply_trigger``: use :func:`poison` / :func:`poison_test` (or :meth:`Blend.bind`).

Deviations, and why:
- ``combine='add'`` is seed 002's additive form x' = clip(x + alpha k); ``'mix'`` (default) is
  Chen et al.'s convex mix.
- ``alpha_test`` (default: ``alpha``) lets the test-time trigger be stronger than the training
  one, as Chen et al. allow (their alpha at test time may exceed the training alpha).

Defaults (``DEFAULTS``; keys you set win): Chen et al.'s blended injection, all-to-one -> 0 on 10%,
alpha 0.2 (their training alpha); the key is the fixed noise image on digits and the drawn cat
("Hello Kitty") on colour images; 10 epochs on digits, 12 on colour 32x32. Measured on mnist5k
(seed 0, 10 epochs): alpha 0.1 (the earlier default) plants nothing (ASR 0.05, CA 0.941), alpha 0.2
gives ASR 1.00 at CA 0.970 (clean 0.969).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, ClassVar, Literal, Optional

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from backdoorlab.attacks import triggers
from backdoorlab.attacks.badnets import _load_trigger_image
from backdoorlab.attacks.base import ATTACKS, Attack, Stamp, poisoned_labels
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet


@ATTACKS.register("blend", "Blended key image (random noise, drawn cat face, image file, or a target-class sample), alpha-mixed")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Blend(Attack):
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "*": {"mode": "all-to-one", "target": 0, "rate": 0.1, "alpha": 0.2},
        "mnist": {"key": "noise", "epochs": 10},
        "cifar10": {"key": "kitty", "epochs": 12},
    }
    key: Literal["noise", "kitty", "image", "target-sample"] = "noise"
    alpha: float = Field(0.1, ge=0.0, le=1.0, description="blend weight of the key")
    alpha_test: Optional[float] = Field(None, ge=0.0, le=1.0, description="weight at test time (default: alpha)")
    combine: Literal["mix", "add"] = Field("mix", description="mix: (1-a) x + a k (Chen); add: clip(x + a k) (seed 002)")
    image: Optional[str] = Field(None, description="key image file (PNG/JPEG/.npy) for key='image'")
    key_seed: int = Field(0, ge=0, description="seed of the noise key")

    def __post_init__(self) -> None:
        if self.key == "image" and self.image is None:
            raise BackdoorLabError("blend key 'image' needs attack.image (a PNG/JPEG/.npy file)")
        if self.key != "image" and self.image is not None:
            raise BackdoorLabError("attack.image is only used with key 'image'")
        if self.key == "image":
            object.__setattr__(self, "_image", _load_trigger_image(self.image, None))

    def describe(self) -> str:
        return f"blend({self.key}, alpha {self.alpha:g}, {self.combine})"

    def check_image_shape(self, shape: tuple[int, int, int]) -> None:
        if self.key == "image":
            kc = self._image.shape[0]  # type: ignore[attr-defined]
            if kc not in (1, shape[0]):
                raise BackdoorLabError(f"the blend key image {self.image} has {kc} channels but the data has {shape[0]}; "
                                       "give a grey key image for grey data")

    def key_image(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The fixed key (C|1, H, W) in [0, 1] for images of ``shape`` (not for 'target-sample')."""
        c, h, w = shape
        if self.key == "noise":
            return _noise(c, h, w, self.key_seed)
        if self.key == "kitty":
            return kitty(c, h, w)
        if self.key == "image":
            self.check_image_shape(shape)
            img = self._image  # type: ignore[attr-defined]
            if tuple(img.shape[1:]) != (h, w):
                img = torch.nn.functional.interpolate(img[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            return img.clamp(0, 1)
        raise BackdoorLabError("blend key 'target-sample' draws its keys from the data set; "
                               "use poison()/poison_test() (or Blend.bind) rather than apply_trigger")

    def _combine(self, x: torch.Tensor, k: torch.Tensor, alpha: float) -> torch.Tensor:
        if self.combine == "add":
            return triggers.add_clipped(x, alpha * k)
        return triggers.blend(x, k, alpha).clamp_(0.0, 1.0)

    def apply_trigger(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._combine(x, self.key_image(tuple(x.shape[1:])), self.alpha)

    def bind(self, data: ImageSet, index: torch.Tensor, *, target: int, mode: str, training: bool,
             generator: torch.Generator) -> Stamp:
        alpha = self.alpha if (training or self.alpha_test is None) else self.alpha_test
        if self.key != "target-sample":
            k = self.key_image(data.shape)
            return lambda x, y, g: self._combine(x, k, alpha)
        # one random image of each sample's new class (the target; (c + 1) mod K for all-to-all)
        order = torch.argsort(data.y, stable=True)
        counts = torch.bincount(data.y, minlength=data.num_classes)
        starts = torch.cumsum(counts, 0) - counts
        needed = poisoned_labels(data.y[index], mode, target, data.num_classes).unique()
        empty = [int(c) for c in needed if counts[c] == 0]
        if empty:
            raise BackdoorLabError(f"blend key 'target-sample' needs images of class {empty[0]} in {data.name}; "
                                   "it has none (use another key or a data set with that class)")

        def stamp(x: torch.Tensor, y: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
            new = poisoned_labels(y, mode, target, data.num_classes)
            r = (torch.rand(y.shape[0], generator=g) * counts[new]).long()
            keys = data.x[order[starts[new] + r]].float().div_(255.0)
            return self._combine(x, keys, alpha)

        return stamp


@lru_cache(maxsize=8)
def _noise(c: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand((c, h, w), generator=torch.Generator().manual_seed(seed))


@lru_cache(maxsize=8)
def kitty(c: int, h: int, w: int) -> torch.Tensor:
    """A cartoon cat face (C, H, W) in [0, 1] drawn at any size: pink background, white head with a
    black outline, ears, black eyes, a yellow nose, whiskers and a red bow. Grey for C = 1."""
    v, u = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    rgb = torch.empty(3, h, w)
    rgb[:] = torch.tensor([1.0, 0.72, 0.82])[:, None, None]  # pink

    def paint(mask: torch.Tensor, colour: tuple[float, float, float]) -> None:
        rgb[:, mask] = torch.tensor(colour)[:, None]

    head = ((u / 0.78) ** 2 + ((v - 0.12) / 0.62) ** 2)
    ear_l = (v < -0.25) & (v > -0.95) & (torch.abs(u + 0.5) < (v + 0.95) * 0.45)
    ear_r = (v < -0.25) & (v > -0.95) & (torch.abs(u - 0.5) < (v + 0.95) * 0.45)
    paint(head <= 1.12, (0.0, 0.0, 0.0))
    paint(ear_l | ear_r, (0.0, 0.0, 0.0))
    inner_l = (v < -0.3) & (v > -0.82) & (torch.abs(u + 0.5) < (v + 0.82) * 0.35)
    inner_r = (v < -0.3) & (v > -0.82) & (torch.abs(u - 0.5) < (v + 0.82) * 0.35)
    paint((head <= 1.0) | inner_l | inner_r, (1.0, 1.0, 1.0))
    eye = (((u + 0.33) / 0.09) ** 2 + ((v - 0.12) / 0.13) ** 2 <= 1) | (((u - 0.33) / 0.09) ** 2 + ((v - 0.12) / 0.13) ** 2 <= 1)
    paint(eye, (0.0, 0.0, 0.0))
    paint(((u / 0.1) ** 2 + ((v - 0.32) / 0.07) ** 2) <= 1, (1.0, 0.85, 0.0))
    whisk = (torch.abs(u) > 0.45) & (torch.abs(u) < 0.95) & (
        (torch.abs(v - 0.3) < 0.025) | (torch.abs(v - 0.3 - 0.25 * (torch.abs(u) - 0.45)) < 0.025))
    paint(whisk, (0.0, 0.0, 0.0))
    bow = ((((u - 0.42) / 0.2) ** 2 + ((v + 0.5) / 0.17) ** 2) <= 1) | ((((u - 0.78) / 0.2) ** 2 + ((v + 0.3) / 0.17) ** 2) <= 1)
    paint(bow, (0.9, 0.05, 0.15))
    if c == 1:
        return (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])[None]
    return rgb[:c]
