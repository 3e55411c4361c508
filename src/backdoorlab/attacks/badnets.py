"""BadNets: a patch or global pattern stamped on poisoned samples.

Paper: T. Gu, B. Dolan-Gavitt, S. Garg, "BadNets: Identifying Vulnerabilities in the Machine
Learning Model Supply Chain", 2017 (arXiv:1708.06733). Local patterns (square, checkerboard, ball) and the global
chessboard follow seed 000 (Ambadkar, after Xiang, Miller & Kesidis' IPTRED); the random
position per image follows seed 002 experiment II.

Deviations, and why:
- ``value`` is the pixel value written by a local patch in [0, 1] (the seed writes 0.2 in its own
  normalised space); for the global chessboard it is the additive amplitude, x' = clip(x + value * b)
  with b the 0/1 board, the additive global pattern of Xiang et al. ``checkerboard`` is a local
  size x size board of ``value`` and 0 pixels (Turner et al.'s clean-label patch; Gu et al. also
  used patterns): a white square cannot show on a corner that is already white, a board shows on
  any corner (docs/cifar10-full.md, STRIP).
- ``position`` names a corner (with ``margin`` pixels to the border), the centre, explicit
  (row, col) of the patch's top-left pixel, or ``random`` (uniform per image over every position
  that fits; issue 3's "avoid the digit" variant is a separate attack).

Defaults (``DEFAULTS``, used when the attack is picked by name; keys you set win): Gu et al.'s
threat model, all-to-one -> class 0 on 10% of the other classes' samples, a 3x3 white square at the
bottom-right; the victim trains 10 epochs on digits (``mnist`` kind), 12 on colour 32x32 images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Tuple, Union

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from backdoorlab.attacks import triggers
from backdoorlab.attacks.base import ATTACKS, Attack
from backdoorlab.errors import BackdoorLabError

Corner = Literal["bottom-right", "bottom-left", "top-right", "top-left", "center", "random"]


@ATTACKS.register("badnets", "BadNets patch (square, checkerboard, ball, image) at a corner/position/random place, or a global chessboard")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class BadNets(Attack):
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "*": {"mode": "all-to-one", "target": 0, "rate": 0.1, "size": 3},
        "mnist": {"epochs": 10},
        "cifar10": {"epochs": 12},
    }
    shape: Literal["square", "checkerboard", "ball", "chessboard", "image"] = "square"
    size: int = Field(3, ge=1, description="patch side in pixels (ignored by chessboard)")
    value: float = Field(1.0, ge=0.0, le=1.0, description="patch pixel value, or chessboard amplitude")
    position: Union[Corner, Tuple[int, int]] = "bottom-right"
    margin: int = Field(0, ge=0, description="pixels between a corner patch and the image border")
    image: Optional[str] = Field(None, description="trigger image file (PNG/JPEG/.npy) for shape='image'")

    def __post_init__(self) -> None:
        if self.shape == "image" and self.image is None:
            raise BackdoorLabError("attack shape 'image' needs attack.image (a PNG/JPEG/.npy file)")
        if self.shape != "image" and self.image is not None:
            raise BackdoorLabError("attack.image is only used with shape 'image'")
        if self.shape == "image":
            object.__setattr__(self, "_pattern", _load_trigger_image(self.image, self.size))

    def describe(self) -> str:
        if self.shape == "chessboard":
            return f"badnets(chessboard, amplitude {self.value:g})"
        return f"badnets({self.shape} {self.size}x{self.size} @ {self.position})"

    def check_image_shape(self, shape: tuple[int, int, int]) -> None:
        c, h, w = shape
        if self.shape == "chessboard":
            return
        extent = self.size + (self.margin if isinstance(self.position, str) and self.position not in ("center", "random") else 0)
        if extent > h or extent > w:
            raise BackdoorLabError(f"the {self.size}x{self.size} patch (margin {self.margin}) does not fit images of {h}x{w}; "
                                   "choose a smaller attack.size")
        if isinstance(self.position, tuple):
            r, q = self.position
            if not (0 <= r <= h - self.size and 0 <= q <= w - self.size):
                raise BackdoorLabError(f"attack.position {self.position} puts the {self.size}x{self.size} patch outside the "
                                       f"{h}x{w} image; top-left must lie in 0..{h - self.size} x 0..{w - self.size}")
        if self.shape == "image":
            pc = self._pattern.shape[0]  # type: ignore[attr-defined]
            if pc not in (1, c):
                raise BackdoorLabError(f"the trigger image has {pc} channels but the data has {c}")

    def _pattern_and_mask(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shape == "image":
            return self._pattern, triggers.square_mask(self.size)  # type: ignore[attr-defined]
        mask = triggers.ball_mask(self.size) if self.shape == "ball" else triggers.square_mask(self.size)
        if self.shape == "checkerboard":  # a local board of value / 0 pixels: visible on bright and dark corners
            return self.value * triggers.chessboard(self.size, self.size)[None], mask
        return torch.full((1, self.size, self.size), self.value), mask

    def _place(self, b: int, h: int, w: int, generator: torch.Generator | None) -> tuple[int | torch.Tensor, int | torch.Tensor]:
        s, m, p = self.size, self.margin, self.position
        if isinstance(p, tuple):
            return int(p[0]), int(p[1])
        if p == "random":
            g = generator if generator is not None else torch.Generator().manual_seed(0)
            return (torch.randint(0, h - s + 1, (b,), generator=g), torch.randint(0, w - s + 1, (b,), generator=g))
        if p == "center":
            return (h - s) // 2, (w - s) // 2
        top = m if p.startswith("top") else h - s - m
        left = m if p.endswith("left") else w - s - m
        return top, left

    def apply_trigger(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        if self.shape == "chessboard":
            return triggers.add_clipped(x, self.value * triggers.chessboard(h, w))
        pattern, mask = self._pattern_and_mask(c)
        top, left = self._place(b, h, w, generator)
        return triggers.stamp(x, pattern, mask, top, left)


def _load_trigger_image(path: str, size: int | tuple[int, int] | None) -> torch.Tensor:
    """Read a trigger image (PNG/JPEG or .npy, values 0..255 or [0,1]) as float (C, size, size)
    (or (C, h, w) for a (h, w) size; as stored for None)."""
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise BackdoorLabError(f"trigger image not found: {p}")
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False).astype(np.float32)
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3)):
            raise BackdoorLabError(f"the trigger image {p} must be grey (H, W) or colour (H, W, 3); got shape {arr.shape}")
        arr = arr / 255.0 if arr.max() > 1.0 else arr
        t = torch.from_numpy(arr)
        t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(p)
            img = img.convert("L") if img.mode in ("L", "1", "P", "LA") else img.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise BackdoorLabError(f"cannot read the trigger image {p}: {exc}") from exc
        t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
        t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    hw = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    if hw is not None and tuple(t.shape[1:]) != hw:
        # documented choice: resize (bilinear) to size x size rather than reject
        t = torch.nn.functional.interpolate(t[None], size=hw, mode="bilinear", align_corners=False)[0]
    return t.clamp(0, 1)
