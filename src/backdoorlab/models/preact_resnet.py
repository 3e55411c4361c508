"""PreAct-ResNet18 (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016).

The CIFAR variant used by BackdoorBench: 3x3 stem, four stages of two pre-activation basic
blocks (64-128-256-512), global average pooling. ``width`` scales every stage (64 = the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backdoorlab.models.base import Classifier, Normalize, default_stats
from backdoorlab.models.registry import MODELS


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


@MODELS.register("preact-resnet18", "PreAct-ResNet18 (11M params at width 64), the BackdoorBench default")
class PreActResNet18(Classifier):
    last_conv = "layer4.1.conv2"

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, int, int] = (3, 32, 32), width: int = 64) -> None:
        super().__init__(num_classes, input_shape)
        c = self.input_shape[0]
        self.norm = Normalize(*default_stats(c))
        self.conv1 = nn.Conv2d(c, width, 3, 1, 1, bias=False)
        widths = [width, 2 * width, 4 * width, 8 * width]
        cin = width
        for i, (wd, stride) in enumerate(zip(widths, [1, 2, 2, 2]), start=1):
            setattr(self, f"layer{i}", nn.Sequential(PreActBlock(cin, wd, stride), PreActBlock(wd, wd, 1)))
            cin = wd
        self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, num_classes)

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.norm(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.relu(self.bn(out))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.conv_features(x), 1), 1)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(f)
