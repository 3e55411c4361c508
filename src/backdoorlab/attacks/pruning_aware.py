"""Pruning-aware attack: hide the backdoor in the channels a pruning defense keeps.

Paper: K. Liu, B. Dolan-Gavitt, S. Garg, "Fine-Pruning: Defending Against Backdooring Attacks on
Deep Neural Networks", RAID 2018 (arXiv:1805.12185), section 4.2, as described in seed 001
(Kashyap et al.): (1) train the network on clean data; (2) prune the channels of the last
convolutional layer that are dormant on clean data (lowest mean activation), ``prune_fraction``
of them; (3) retrain the pruned network on the poisoned training set; (4) "de-prune": put the
pruned channels back with their weights and biases from step 1. The backdoor now lives in
channels that are active on clean inputs; the restored channels are decoys, dormant on clean
data, which a pruning defense removes first, at no cost to the backdoor.

The poisoning trigger of step 3 is any data-poisoning attack of the registry (``trigger``: its name
and parameters, BadNets by default); its threat model is the run's (``mode``, ``rate``, ``target``).

Deviations, and why:
- "pruning" a channel zeroes its output activation with a forward hook (the weights stay in
  place), at the last conv layer (``model.last_conv``) or, when a batch norm follows it (VGG,
  PreAct-ResNet's final BN), at that batch norm, so that the channel really is silent downstream.
  Activations are ranked by the mean of relu(output) on the clean training data.
- step 4 restores the pruned channels' conv (and batch-norm) parameters from step 1 (they were
  frozen by the zero gradient but shrunk by weight decay in step 3).
- the helpers :func:`prune_point`, :func:`channel_activation` and :func:`mask_channels` are the
  minimal plain pruning used by ``benchmarks/bench_attacks.py``; the fine-pruning defense lives in
  ``defenses/``.

Defaults (``DEFAULTS``; keys you set win): BadNets 3x3 all-to-one -> 0 on 10% (the paper's
backdoor), half of the last conv layer's channels pruned; each stage trains ``train.epochs``
(5 clean + 5 poisoned on digits: the 10 epochs of a plain victim; 12 + 12 on colour images).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Dict, Optional

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn
from torch.utils.hooks import RemovableHandle

from backdoorlab.attacks.base import ATTACKS, Attack, TrainedVictim, TrainingAttack, poison
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- plain pruning helpers
def prune_point(model: nn.Module) -> tuple[nn.Conv2d, nn.Module]:
    """(the last conv layer, the module whose output channels are zeroed to prune it): the batch
    norm right after the conv when there is one with as many channels, else the conv itself."""
    name = getattr(model, "last_conv", "")
    modules = dict(model.named_modules())
    conv = modules.get(name) if name else None
    if not isinstance(conv, nn.Conv2d):
        raise BackdoorLabError("pruning needs a native model with a last convolutional layer (model.last_conv); "
                               f"{type(model).__name__} has {name or 'none'}")
    names = list(modules)
    after = [m for n, m in modules.items() if names.index(n) > names.index(name)]
    bns = [m for m in after if isinstance(m, nn.BatchNorm2d) and m.num_features == conv.out_channels]
    return conv, (bns[-1] if bns else conv)


def mask_channels(model: nn.Module, channels: torch.Tensor) -> RemovableHandle:
    """Zero the output of the last conv layer's ``channels`` (int64) until ``handle.remove()``."""
    _, point = prune_point(model)
    keep = torch.ones(getattr(point, "out_channels", None) or point.num_features)
    keep[channels.long()] = 0.0

    def hook(_m, _inp, out):
        return out * keep.to(out)[None, :, None, None]

    return point.register_forward_hook(hook)


@torch.inference_mode()
def channel_activation(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Mean relu(activation) of every last-conv channel (C,) over uint8 or float images (N, C, H, W)."""
    _, point = prune_point(model)
    sums: list[torch.Tensor] = []

    def hook(_m, _inp, out):
        sums.append(torch.relu(out.float()).sum((0, 2, 3)).cpu() / (out.shape[2] * out.shape[3]))

    handle = point.register_forward_hook(hook)
    try:
        model.eval()
        device = next(model.parameters()).device
        for s in range(0, x.shape[0], batch_size):
            xb = x[s:s + batch_size]
            xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
            model(xb.to(device))
    finally:
        handle.remove()
    return torch.stack(sums).sum(0) / max(1, x.shape[0])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    conv, point = prune_point(model)
    mods = [conv] + ([point] if point is not conv else [])
    out = {}
    for i, m in enumerate(mods):
        for k, v in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if v is not None and v.dim() >= 1 and v.shape[0] == conv.out_channels:
                out[f"{i}.{k}"] = v.detach().clone()
    return out


def _restore(model: nn.Module, snap: dict[str, torch.Tensor], channels: torch.Tensor) -> None:
    conv, point = prune_point(model)
    mods = [conv] + ([point] if point is not conv else [])
    with torch.no_grad():
        for key, saved in snap.items():
            i, name = key.split(".", 1)
            t = getattr(mods[int(i)], name)
            t[channels] = saved[channels].to(t)


# ----------------------------------------------------------------------------- the attack
@ATTACKS.register("pruning-aware", "Pruning-aware: train clean, prune dormant last-conv channels, retrain poisoned, de-prune (Liu et al. 2018)")
@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class PruningAware(TrainingAttack):
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {
        "*": {"mode": "all-to-one", "target": 0, "rate": 0.1, "prune_fraction": 0.5},
        "mnist": {"epochs": 5},
        "cifar10": {"epochs": 12},
    }
    trigger: Dict[str, Any] = Field(default_factory=lambda: {"name": "badnets"},
                                    description="the data-poisoning attack of step 3: {name: ... (default badnets), its parameters}")
    prune_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="fraction of last-conv channels pruned in step 2")
    clean_epochs: Optional[int] = Field(None, ge=1, description="step-1 epochs (default: train.epochs)")
    retrain_epochs: Optional[int] = Field(None, ge=1, description="step-3 epochs (default: train.epochs)")
    retrain_lr: Optional[float] = Field(None, gt=0.0, description="step-3 learning rate (default: train.lr; a recipe's "
                                        "decoupled weight decay scales with it)")

    def __post_init__(self) -> None:
        spec = dict(self.trigger)
        name = spec.pop("name", "badnets")
        if not isinstance(name, str):
            raise BackdoorLabError("attack.trigger.name must name the data-poisoning attack of step 3, e.g. {name: badnets, size: 3}")
        inner = ATTACKS.build(name, spec, where="attack.trigger")
        if not isinstance(inner, Attack):
            raise BackdoorLabError(f"attack.trigger: {name!r} is a training-time attack; pick a data-poisoning attack "
                                   "(e.g. badnets, blend)")
        object.__setattr__(self, "_inner", inner)

    @property
    def inner(self) -> Attack:
        """The data-poisoning attack used in step 3."""
        return self._inner  # type: ignore[attr-defined]

    @property
    def modes(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.inner.modes

    def describe(self) -> str:
        return f"pruning-aware({self.inner.describe()}, prune {self.prune_fraction:g})"

    def check(self, data: ImageSet, *, rate: float, target: int, source: int | None, mode: str) -> None:
        super().check(data, rate=rate, target=target, source=source, mode=mode)
        self.inner.check_image_shape(data.shape)

    def train_victim(self, model: nn.Module, data: ImageSet, cfg, *, rate: float, target: int,
                     source: int | None = None, mode: str = "all-to-one", seed: int = 0,
                     callbacks: tuple = ()) -> TrainedVictim:
        from backdoorlab.train import train

        self.check(data, rate=rate, target=target, source=source, mode=mode)
        conv, _ = prune_point(model)
        # 1. clean training
        c1 = cfg.model_copy(update={"epochs": self.clean_epochs or cfg.epochs})
        h1 = train(model, data, c1, seed=seed, callbacks=callbacks)
        # 2. prune the channels most dormant on clean data
        act = channel_activation(model, data.x)
        k = int(round(self.prune_fraction * conv.out_channels))
        pruned = torch.argsort(act)[:k].sort().values
        snap = _snapshot(model)
        # 3. retrain the pruned network on poisoned data
        g = torch.Generator().manual_seed(seed + 1)
        poisoned = poison(data, self.inner, rate=rate, target=target, source=source, mode=mode, generator=g)
        c3 = cfg.at_lr(self.retrain_lr or cfg.lr, epochs=self.retrain_epochs or cfg.epochs)
        handle = mask_channels(model, pruned)
        try:
            h3 = train(model, poisoned.without_ground_truth(), c3, seed=seed + 1, callbacks=callbacks)
        finally:
            handle.remove()
        # 4. de-prune: the pruned channels come back with their step-1 parameters
        _restore(model, snap, pruned)
        model.eval()
        log.info("pruning-aware: pruned and restored %d of %d channels of %s", k, conv.out_channels, model.last_conv)
        tg = torch.Generator()

        def trigger(x: torch.Tensor) -> torch.Tensor:
            tg.manual_seed(seed + 2)
            return self.inner.apply_trigger(x, tg)

        epochs = h1.as_dict()["epochs"] + h3.as_dict()["epochs"]
        for i, e in enumerate(epochs):
            e["epoch"] = i + 1  # one numbering over both stages
        history = {"epochs": epochs, "seconds": h1.seconds + h3.seconds,
                   "stages": {"clean": len(h1.epochs), "retrain": len(h3.epochs)}}
        return TrainedVictim(model, trigger, history, poisoned,
                             {"pruned_channels": pruned.tolist(), "clean_activation": act.tolist()}, attack=self.inner)
