"""Small CNN for 28x28 / 32x32 grey digits (2 conv + 2 FC, ~0.32M parameters on MNIST).

The classic Keras/PyTorch MNIST example network (conv3x3-32, conv3x3-64, FC-128), with
padding on the first convolution: without it the last two rows and columns of a 28x28 image lie
outside every pooled unit's receptive field, and a corner patch (seed 000's 2x2 at (28, 28)) would
be invisible to the network. Pools before its ReLUs (identical outputs, less work). Trains in channels_last memory format (benchmarks/bench_train.py).
"""

from __future__ import annotations

import torch
from torch import nn

from backdoorlab.models.base import Classifier, Normalize, default_stats
from backdoorlab.models.registry import MODELS


@MODELS.register("cnn", "small CNN (2 conv + 2 FC, ~0.3M params) for MNIST-sized grey images")
class SmallCNN(Classifier):
    last_conv = "conv2"

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28),
                 width: int = 32, hidden: int = 128) -> None:
        super().__init__(num_classes, input_shape)
        c, h, w = self.input_shape
        self.norm = Normalize(*default_stats(c))
        self.conv1 = nn.Conv2d(c, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        # conv1 keeps the size (padding 1) so border pixels (where patches go) reach the classifier;
        # every pixel lies in the receptive field of the last pooled map
        hh, ww = (h // 2 - 2) // 2, (w // 2 - 2) // 2
        if hh < 1 or ww < 1:
            from backdoorlab.errors import BackdoorLabError

            raise BackdoorLabError(f"model 'cnn' needs images of at least 8x8 pixels; got {h}x{w}")
        self.fc1 = nn.Linear(2 * width * hh * ww, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        # max pooling before the ReLU: the two commute exactly (max(relu(a), relu(b)) = relu(max(a, b))),
        # same outputs and weights, but the ReLU (and its backward) runs on a quarter of the values:
        # forward 1.1-1.2x, forward+backward 1.3-1.5x faster on the 2-core CPU at 128 images
        x = self.act(self.pool(self.conv1(self.norm(x))))
        return self.act(self.pool(self.conv2(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc1(torch.flatten(self.conv_features(x), 1)))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc2(f)
