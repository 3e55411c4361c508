"""What every data-poisoning attack shares: the :class:`Attack` contract, sample selection
(:func:`choose_indices`), :func:`poison` for the training set and :func:`poison_test` for ASR.

Threat models (``mode``):
- ``all-to-one``: samples of every class but the target are stamped and relabelled to ``target``;
- ``source-specific``: only class ``source`` is stamped and relabelled to ``target``;
- ``all-to-all``: samples of every class c are stamped and relabelled to (c + 1) mod K;
- ``clean-label``: only target-class samples are stamped; no label changes.

``rate`` is the fraction of the *eligible* samples that get poisoned (eligible: the non-target
classes, the source class, all samples, or the target class, by mode).
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar, Literal

import torch

from backdoorlab.errors import BackdoorLabError
from backdoorlab.registry import Registry
from backdoorlab.types import ImageSet, PoisonedSet

log = logging.getLogger(__name__)

Mode = Literal["all-to-one", "source-specific", "all-to-all", "clean-label"]
MODES: tuple[str, ...] = ("all-to-one", "source-specific", "all-to-all", "clean-label")


class Attack:
    """A data-poisoning attack: a pure trigger plus its default threat model.

    Subclasses are frozen (pydantic) dataclasses whose fields are validated at construction.
    ``apply_trigger`` maps float (B, C, H, W) in [0, 1] to a new tensor of the same shape and range;
    it may draw from ``generator`` (random positions) but is otherwise pure.
    """

    #: modes this attack supports; clean-label-only attacks restrict this
    modes: ClassVar[tuple[str, ...]] = ("all-to-one", "source-specific", "all-to-all", "clean-label")

    def apply_trigger(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def check_image_shape(self, shape: tuple[int, int, int]) -> None:
        """Raise :class:`BackdoorLabError` if the trigger cannot be applied to (C, H, W) images."""

    def describe(self) -> str:
        return type(self).__name__


ATTACKS: Registry[Attack] = Registry("attack")


def eligible_mask(y: torch.Tensor, mode: str, target: int, source: int | None) -> torch.Tensor:
    if mode == "all-to-one":
        return y != target
    if mode == "source-specific":
        return y == source
    if mode == "all-to-all":
        return torch.ones_like(y, dtype=torch.bool)
    if mode == "clean-label":
        return y == target
    raise BackdoorLabError(f"unknown poisoning mode {mode!r}; known: {', '.join(MODES)}")


def poisoned_labels(y: torch.Tensor, mode: str, target: int, num_classes: int) -> torch.Tensor:
    if mode in ("all-to-one", "source-specific"):
        return torch.full_like(y, target)
    if mode == "all-to-all":
        return (y + 1) % num_classes
    return y.clone()


def check_threat_model(mode: str, target: int, source: int | None, num_classes: int, class_names=()) -> None:
    if mode not in MODES:
        raise BackdoorLabError(f"unknown poisoning mode {mode!r}; known: {', '.join(MODES)}")
    if mode != "all-to-all" and not 0 <= target < num_classes:
        raise BackdoorLabError(f"attack.target={target} is not a class of this data set (0..{num_classes - 1})")
    if mode == "source-specific":
        if source is None:
            raise BackdoorLabError("mode 'source-specific' needs attack.source (the class to poison)")
        if not 0 <= source < num_classes:
            raise BackdoorLabError(f"attack.source={source} is not a class of this data set (0..{num_classes - 1})")
        if source == target:
            raise BackdoorLabError(f"attack.source and attack.target are both {source}; choose two different classes")
    elif source is not None:
        raise BackdoorLabError(f"attack.source is only used with mode 'source-specific' (mode is {mode!r})")


def choose_indices(
    y: torch.Tensor, *, rate: float, mode: str, target: int, source: int | None, generator: torch.Generator,
) -> torch.Tensor:
    """Indices (sorted) of the samples to poison: ``round(rate * n_eligible)``, at least 1."""
    if not 0.0 < rate <= 1.0:
        raise BackdoorLabError(f"attack.rate must lie in (0, 1]; got {rate}")
    eligible = torch.nonzero(eligible_mask(y, mode, target, source)).flatten()
    if eligible.numel() == 0:
        which = {"source-specific": f"source class {source}", "clean-label": f"target class {target}"}.get(mode, "any class")
        raise BackdoorLabError(f"no training samples of {which} to poison: the class is empty in this split")
    n = max(1, int(math.floor(rate * eligible.numel() + 0.5)))
    pick = torch.randperm(eligible.numel(), generator=generator)[:n]
    return eligible[pick].sort().values


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def apply_in_batches(attack: Attack, x: torch.Tensor, generator: torch.Generator | None, batch: int = 4096) -> torch.Tensor:
    """Stamp uint8 images (N, C, H, W) in float batches; returns uint8."""
    out = torch.empty_like(x)
    for s in range(0, x.shape[0], batch):
        xb = x[s:s + batch].float().div_(255.0)
        yb = attack.apply_trigger(xb, generator)
        if yb.shape != xb.shape:
            raise RuntimeError(f"{attack.describe()}: trigger changed the shape {tuple(xb.shape)} -> {tuple(yb.shape)}")
        out[s:s + batch] = _to_uint8(yb)
    return out


def poison(
    data: ImageSet, attack: Attack, *, rate: float, target: int, source: int | None = None,
    mode: str = "all-to-one", generator: torch.Generator | None = None,
) -> PoisonedSet:
    """Poison a training set: choose samples, stamp them, relabel them (in place of the originals)."""
    check_threat_model(mode, target, source, data.num_classes)
    if mode not in attack.modes:
        raise BackdoorLabError(f"attack {attack.describe()} supports modes {', '.join(attack.modes)}; got {mode!r}")
    attack.check_image_shape(data.shape)
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    idx = choose_indices(data.y, rate=rate, mode=mode, target=target, source=source, generator=g)
    x = data.x.clone()
    y = data.y.clone()
    x[idx] = apply_in_batches(attack, data.x[idx], g)
    y[idx] = poisoned_labels(data.y[idx], mode, target, data.num_classes)
    is_poison = torch.zeros(len(data), dtype=torch.bool)
    is_poison[idx] = True
    log.info("poisoned %d of %d samples (%s, target %s)", idx.numel(), len(data), mode, target)
    return PoisonedSet(x, y, data.num_classes, data.class_names, f"{data.name}-poisoned",
                       is_poison=is_poison, y_source=data.y.clone())


def poison_test(
    data: ImageSet, attack: Attack, *, target: int, source: int | None = None, mode: str = "all-to-one",
    generator: torch.Generator | None = None,
) -> PoisonedSet:
    """The triggered test set for ASR: every sample the attack should flip, stamped, labelled
    with the attacker's target. All-to-one and clean-label: the non-target samples; source-specific:
    the source class; all-to-all: every sample, labelled (c + 1) mod K."""
    check_threat_model(mode, target, source, data.num_classes)
    attack.check_image_shape(data.shape)
    g = generator if generator is not None else torch.Generator().manual_seed(1)
    if mode == "source-specific":
        keep = data.y == source
    elif mode == "all-to-all":
        keep = torch.ones_like(data.y, dtype=torch.bool)
    else:
        keep = data.y != target
    idx = torch.nonzero(keep).flatten()
    if idx.numel() == 0:
        raise BackdoorLabError("the test set has no samples the attack should flip (check source/target)")
    x = apply_in_batches(attack, data.x[idx], g)
    y_src = data.y[idx]
    y_new = (y_src + 1) % data.num_classes if mode == "all-to-all" else torch.full_like(y_src, target)
    return PoisonedSet(x, y_new, data.num_classes, data.class_names, f"{data.name}-triggered",
                       is_poison=torch.ones(idx.numel(), dtype=torch.bool), y_source=y_src.clone())
