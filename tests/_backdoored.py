"""A small BadNets victim shared by the defense tests (trained once per session, in memory).

BadNets 3x3 white patch, bottom-right, all-to-one -> 0, 10% of the non-target training images.
On the full MNIST copy in ``shared/data`` when present (8,000 training images, 2,000 clean
held-out, 1,000 test; 4 epochs, ~15 s on one core); otherwise on the embedded mnist5k (CA/ASR
bars that need the larger held-out set are then skipped).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from backdoorlab.types import ImageSet, PoisonedSet

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "mnist.npz"


@dataclass(frozen=True)
class Victim:
    model: torch.nn.Module
    train: PoisonedSet
    holdout: ImageSet
    test: ImageSet
    triggered: PoisonedSet
    full_mnist: bool


@lru_cache(maxsize=1)
def victim() -> Victim:
    from backdoorlab.models import ModelSpec, build_model
    from backdoorlab.train import TrainConfig, train

    poisoned, holdout, test, triggered, full = poisoned_data()
    torch.manual_seed(0)  # the initial weights: an unseeded init made the victim (and the bars) vary run to run
    model = build_model(ModelSpec("cnn", 10, (1, 28, 28)))
    train(model, poisoned.without_ground_truth(), TrainConfig(epochs=4, warmup=0), seed=0)  # the calibrated victim (measured before the warm-up default)
    model.eval()
    return Victim(model, poisoned, holdout, test, triggered, full)


@lru_cache(maxsize=1)
def poisoned_data() -> tuple[PoisonedSet, ImageSet, ImageSet, PoisonedSet, bool]:
    """(poisoned training set, clean held-out, test, triggered test, full MNIST?) of the victim."""
    from backdoorlab.attacks import ATTACKS, poison, poison_test
    from backdoorlab.data import load_source, make_splits

    full = SHARED_MNIST.is_file()
    if full:
        raw = load_source("npz", path=str(SHARED_MNIST), num_classes=10)
        sp = make_splits(raw.train, raw.test, seed=0, holdout_fraction=0.2, train_size=8000, test_size=1000)
    else:
        raw = load_source("mnist5k")
        sp = make_splits(raw.train, None, seed=0, holdout_fraction=0.1)
    attack = ATTACKS.create("badnets", size=3)
    poisoned = poison(sp.train, attack, rate=0.1, target=0, generator=torch.Generator().manual_seed(1))
    triggered = poison_test(sp.test, attack, target=0)
    return poisoned, sp.holdout, sp.test, triggered, full
