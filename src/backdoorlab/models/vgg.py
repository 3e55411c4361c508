"""Small VGG-style network for 32x32 colour images (6 conv with batch norm + 2 FC, ~1.2M params).

A CPU-sized stand-in for VGG-16 (Simonyan & Zisserman 2015): three blocks of two 3x3
convolutions (32-64-128 channels) with batch norm and max pooling, then FC-256 and the classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from backdoorlab.models.base import Classifier, Normalize, default_stats
from backdoorlab.models.registry import MODELS


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@MODELS.register("vgg-small", "small VGG (6 conv + BN, 2 FC, ~1.2M params) for 32x32 colour images")
class SmallVGG(Classifier):
    last_conv = "body.17"

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, int, int] = (3, 32, 32),
                 width: int = 32, hidden: int = 256) -> None:
        super().__init__(num_classes, input_shape)
        c, h, w = self.input_shape
        self.norm = Normalize(*default_stats(c))
        w1, w2, w3 = width, 2 * width, 4 * width
        layers: list[nn.Module] = [
            *_block(c, w1), *_block(w1, w1), nn.MaxPool2d(2),
            *_block(w1, w2), *_block(w2, w2), nn.MaxPool2d(2),
            *_block(w2, w3), *_block(w3, w3), nn.AdaptiveAvgPool2d(2),
        ]
        self.body = nn.Sequential(*layers)
        self.fc1 = nn.Linear(w3 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.drop = nn.Dropout(0.3)

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc1(torch.flatten(self.conv_features(x), 1)))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(f))
