"""Backdoored victims shared by the defense benchmarks (not part of the library).

Each victim is trained once (seeded) and cached as safetensors under ``$BACKDOORLAB_BENCH_CACHE``
(default ``/tmp/backdoorlab-bench-cache``), keyed by every setting that determines it.

Triggers: the BadNets 3x3 white patch at the bottom-right (registered ``badnets``; ``patch_size``
changes its side), a blend
trigger ``x' = (1 - alpha) x + alpha k`` with a fixed uniform-noise image k (Chen et al. 2017's
random-pattern blend; alpha 0.2; kept here rather than the registered ``blend`` so that cached
victims and earlier figures stay comparable), and ``pruning-aware``: the registered training-time
attack (train clean, prune half the last-conv channels, retrain on the same BadNets poisoning,
de-prune), its triggered test set built with the same 3x3 patch.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from _common import SHARED_DATA

from backdoorlab.attacks import ATTACKS, poison, poison_test
from backdoorlab.attacks.base import Attack
from backdoorlab.attacks import triggers
from backdoorlab.data import load_source, make_splits
from backdoorlab.models import ModelSpec, build_model, load_model, save_model
from backdoorlab.train import TrainConfig, evaluate, train
from backdoorlab.types import ImageSet, PoisonedSet, Splits

CACHE = Path(os.environ.get("BACKDOORLAB_BENCH_CACHE", "/tmp/backdoorlab-bench-cache"))


class NoiseBlend(Attack):
    """x' = (1 - alpha) x + alpha k, k a fixed uniform noise image (seeded)."""

    def __init__(self, shape: tuple[int, int, int], alpha: float = 0.2, seed: int = 12345) -> None:
        self.alpha = alpha
        self.k = torch.rand(shape, generator=torch.Generator().manual_seed(seed))

    def apply_trigger(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return triggers.blend(x, self.k, self.alpha)

    def describe(self) -> str:
        return f"blend(noise, alpha {self.alpha:g})"


@dataclass
class Victim:
    name: str
    model: torch.nn.Module
    splits: Splits
    triggered: PoisonedSet
    attack: Attack
    train_seconds: float
    clean_accuracy: float
    attack_success_rate: float

    def describe(self) -> str:
        s = self.splits.summary()
        return (f"{self.name}: train {s['train']} (10% of non-target poisoned), holdout {s['holdout']}, test {s['test']}, "
                f"triggered test {len(self.triggered)}; CA {self.clean_accuracy:.4f}, ASR {self.attack_success_rate:.4f}"
                f"{'' if self.train_seconds < 0 else f', trained in {self.train_seconds:.0f} s'}")


def load_data(data: str) -> tuple[ImageSet, ImageSet]:
    if data == "mnist":
        raw = load_source("npz", path=str(SHARED_DATA / "mnist" / "mnist.npz"), num_classes=10)
    elif data == "cifar10":
        raw = load_source("cifar10", root=str(SHARED_DATA))
    elif data == "mnist5k":
        raw = load_source("mnist5k")
    else:
        raise SystemExit(f"unknown data {data}")
    return raw.train, raw.test


def victim(data: str = "mnist", trigger: str = "patch", *, model: str = "cnn", epochs: int = 5, seed: int = 0,
           rate: float = 0.1, target: int = 0, mode: str = "all-to-one", source: int | None = None,
           lr: float = 0.05, crop_padding: int = 0, flip: bool = False, holdout_fraction: float = 0.05,
           patch_size: int = 3) -> Victim:
    train_set, test_set = load_data(data)
    splits = make_splits(train_set, test_set, seed=seed, holdout_fraction=holdout_fraction)
    attack: Attack = NoiseBlend(splits.train.shape) if trigger == "blend" else ATTACKS.create("badnets", size=patch_size)
    g = torch.Generator().manual_seed(seed + 1)
    poisoned = poison(splits.train, attack, rate=rate, target=target, source=source, mode=mode, generator=g)
    triggered = poison_test(splits.test, attack, target=target, source=source, mode=mode,
                            generator=torch.Generator().manual_seed(seed + 2))
    cfg = TrainConfig(epochs=epochs, lr=lr, crop_padding=crop_padding, flip=flip)
    extra = ([] if holdout_fraction == 0.05 else [holdout_fraction]) + ([] if patch_size == 3 else [f"patch{patch_size}"])
    key = hashlib.sha256(json.dumps([data, trigger, model, seed, rate, target, mode, source, cfg.model_dump(), *extra],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"{data}-{trigger}-{model}-{key}.safetensors"
    seconds = -1.0
    if path.is_file():
        net = load_model(path)
    else:
        net = build_model(ModelSpec(model, splits.train.num_classes, splits.train.shape))
        t0 = time.perf_counter()
        if trigger == "pruning-aware":
            pa = ATTACKS.create("pruning-aware", trigger={"name": "badnets", "size": patch_size})
            pa.train_victim(net, splits.train, cfg, rate=rate, target=target, source=source, mode=mode, seed=seed)
        else:
            train(net, poisoned.without_ground_truth(), cfg, seed=seed)
        seconds = time.perf_counter() - t0
        save_model(net, path)
    net.eval()
    what = f"pruning-aware {attack.describe()}" if trigger == "pruning-aware" else attack.describe()
    name = f"{data} {model} {what} {mode} -> {target}, {epochs} epochs, seed {seed}"
    return Victim(name, net, splits, triggered, attack, seconds, evaluate(net, splits.test), evaluate(net, triggered))
