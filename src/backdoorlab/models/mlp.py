"""A multi-layer perceptron for small grey images: flatten, two hidden ReLU layers, classifier.

No convolution, so a trigger is just a set of input pixels: the architecture most unlike the CNNs
the inspectors were developed on (population benchmarks need such variety).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from backdoorlab.models.base import Classifier, Normalize, default_stats
from backdoorlab.models.registry import MODELS


@MODELS.register("mlp", "multi-layer perceptron (2 hidden ReLU layers, ~0.24M params on MNIST)")
class MLP(Classifier):
    last_conv = ""  # none: pruning defenses prune fc1's inputs or hidden neurons (layer="fc2")

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28),
                 hidden: int = 256, hidden2: int = 128) -> None:
        super().__init__(num_classes, input_shape)
        c = self.input_shape[0]
        self.norm = Normalize(*default_stats(c))
        self.fc1 = nn.Linear(math.prod(self.input_shape), hidden)
        self.fc2 = nn.Linear(hidden, hidden2)
        self.fc3 = nn.Linear(hidden2, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(torch.flatten(self.norm(x), 1)))
        return torch.relu(self.fc2(h))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc3(f)
