"""The contract every classifier in backdoorlab keeps.

A model takes float (B, C, H, W) in [0, 1] and returns logits (B, K); any input normalisation
lives inside it (a saved or exported model needs nothing else). Native models also expose
``features(x)`` (penultimate activations, (B, D)) and ``last_conv`` (the module name of the
last convolutional layer), so defenses never switch on model names.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel (x - mean) / std with the statistics stored as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """Base for native models: ``forward = head(features(x))``."""

    #: module name of the last convolutional layer (used by pruning and activation defenses)
    last_conv: str = ""

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def head(self, f: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def default_stats(channels: int) -> tuple[list[float], list[float]]:
    """Normalisation used inside the models: MNIST-like for 1 channel, CIFAR-like for 3."""
    if channels == 1:
        return [0.1307], [0.3081]
    return [0.4914, 0.4822, 0.4465][:channels], [0.2470, 0.2435, 0.2616][:channels]
