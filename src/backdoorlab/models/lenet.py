"""LeNet-5 style network (LeCun et al. 1998): tanh activations and average pooling.

conv5x5-6 (padding 2), avg-pool, conv5x5-16, avg-pool, FC-120, FC-84, classifier, all with tanh:
the saturating activations and smooth pooling of the classic net, unlike the ReLU / max-pool CNNs.
"""

from __future__ import annotations

import torch
from torch import nn

from backdoorlab.errors import BackdoorLabError
from backdoorlab.models.base import Classifier, Normalize, default_stats
from backdoorlab.models.registry import MODELS


@MODELS.register("lenet", "LeNet-5 style (tanh, average pooling; ~60k params) for small grey or colour images")
class LeNet(Classifier):
    last_conv = "conv2"

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28), width: int = 6) -> None:
        super().__init__(num_classes, input_shape)
        c, h, w = self.input_shape
        hh, ww = (h // 2 - 4) // 2, (w // 2 - 4) // 2
        if hh < 1 or ww < 1:
            raise BackdoorLabError(f"model 'lenet' needs images of at least 12x12 pixels; got {h}x{w}")
        self.norm = Normalize(*default_stats(c))
        self.conv1 = nn.Conv2d(c, width, 5, padding=2)
        self.conv2 = nn.Conv2d(width, 16 * width // 6, 5)
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(16 * width // 6 * hh * ww, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.tanh(self.conv1(self.norm(x))))
        return self.pool(torch.tanh(self.conv2(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc2(torch.tanh(self.fc1(torch.flatten(self.conv_features(x), 1)))))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc3(f)
