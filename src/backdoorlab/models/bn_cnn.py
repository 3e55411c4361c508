"""A batch-normalised conv net for small images: three conv-BN-ReLU blocks, global average pooling.

conv3x3 (width, 2 width, 4 width) each followed by batch norm and ReLU, max pooling after the first
two, global average pooling and one linear classifier: no fully connected hidden layer, so the last
convolution's channels are the features (as in ResNets), unlike ``cnn``.
"""

from __future__ import annotations

import torch
from torch import nn

from backdoorlab.models.base import Classifier, Normalize, default_stats
from backdoorlab.models.registry import MODELS


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


@MODELS.register("bn-cnn", "conv net with batch norm and global average pooling (3 blocks, ~24k params at width 16)")
class BNCNN(Classifier):
    last_conv = "body.8"

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28), width: int = 16) -> None:
        super().__init__(num_classes, input_shape)
        c = self.input_shape[0]
        self.norm = Normalize(*default_stats(c))
        self.body = nn.Sequential(*_block(c, width), nn.MaxPool2d(2), *_block(width, 2 * width), nn.MaxPool2d(2),
                                  *_block(2 * width, 4 * width))
        self.fc = nn.Linear(4 * width, num_classes)

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_features(x).mean((2, 3))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)
