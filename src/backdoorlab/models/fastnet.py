"""``fastnet``: the network of airbench94 (K. Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single
GPU", arXiv:2404.00498, 2024), for fast training of a strong CIFAR-10 victim on a CPU.

Layout as in the paper: a 2x2 patch-whitening convolution (no padding; 2 x C x 2 x 2 = 24 filters
for RGB: the eigenvectors of the training patches' covariance, scaled by 1/sqrt(eigenvalue), and
their negatives; initialised from the data by :meth:`FastNet.init_from_data`, which the trainer
calls before the first step; weights frozen, bias trained), GELU, then three blocks of
conv3x3 - maxpool2 - BN - GELU - conv3x3 - BN - GELU at widths 64-256-256, a global max pool, a
linear head without bias and logits scaled by 1/9. Batch norm has frozen unit weights, a trained
bias (whose learning rate the recipe scales by ``bias_scale``, the paper's 64: :meth:`FastNet.param_groups`), eps 1e-12 and
running-statistics momentum 0.4 (the paper's 0.6 in its convention). Convolutions start with a
Dirac (identity) init on their first input-channel many filters.

In eval mode the forward pass averages the logits of the image and its mirror image (the paper's
flip test-time augmentation, its level 1); ``tta=False`` turns it off. ``features``/``head`` (used
by defenses) see one view.

Deviations: the whitening bias is trained throughout (the paper freezes it after 3 epochs); no
translate test-time augmentation (level 2); the global pool is adaptive (any image size); training
flips are random, not the paper's alternating flips. The recipe (label smoothing 0.2, nesterov SGD
with decoupled weight decay, lookahead, bf16 autocast) lives in the train config
(``configs/fastnet_cifar10.yaml``); measured figures: docs/cifar10-full.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backdoorlab.errors import BackdoorLabError
from backdoorlab.models.base import Classifier, Normalize, default_stats
from backdoorlab.models.registry import MODELS


class _BatchNorm(nn.BatchNorm2d):
    def __init__(self, n: int) -> None:
        super().__init__(n, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class _Conv(nn.Conv2d):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1, bias=False)
        with torch.no_grad():
            nn.init.dirac_(self.weight[:cin])


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _Conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = _BatchNorm(cout)
        self.conv2 = _Conv(cout, cout)
        self.bn2 = _BatchNorm(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.bn1(self.pool(self.conv1(x))))
        return F.gelu(self.bn2(self.conv2(x)))


@MODELS.register("fastnet", "airbench94's net (whitening conv, BN, GELU, 64-256-256; flip TTA): CIFAR-10 0.9 in minutes "
                 "on a CPU with configs/fastnet_cifar10.yaml")
class FastNet(Classifier):
    last_conv = "block3.conv2"

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, int, int] = (3, 32, 32),
                 widths: tuple[int, int, int] = (64, 256, 256), tta: bool = True, scale: float = 1 / 9,
                 bias_scale: float = 64.0) -> None:
        super().__init__(num_classes, input_shape)
        c = self.input_shape[0]
        w1, w2, w3 = (int(w) for w in widths)
        self.norm = Normalize(*default_stats(c))
        self.whiten = nn.Conv2d(c, 2 * c * 4, 2, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.block1 = _Block(2 * c * 4, w1)
        self.block2 = _Block(w1, w2)
        self.block3 = _Block(w2, w3)
        self.fc = nn.Linear(w3, num_classes, bias=False)
        self.tta = bool(tta)
        self.scale = float(scale)
        if not bias_scale > 0:
            raise BackdoorLabError(f"model 'fastnet': bias_scale must be > 0 (the batch-norm biases' learning-rate "
                                   f"factor; the paper's 64), got {bias_scale}")
        self.bias_scale = float(bias_scale)
        self.register_buffer("whitened", torch.zeros((), dtype=torch.bool))  # saved: a loaded model keeps its filters

    @torch.no_grad()
    def init_from_data(self, x: torch.Tensor, eps: float = 5e-4, force: bool = False) -> None:
        """Set the whitening filters from float images ``x`` (N, C, H, W) in [0, 1] (a few thousand).
        Once only (the trainer calls it at every start: fine-tuning a trained model keeps its
        filters) unless ``force``."""
        if bool(self.whitened) and not force:
            return
        x = self.norm(x.float().to(self.whiten.weight.device))
        c, k = x.shape[1], self.whiten.kernel_size[0]
        patches = x.unfold(2, k, 1).unfold(3, k, 1).transpose(1, 3).reshape(-1, c * k * k)  # (P, C*k*k)
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / patches.shape[0]
        evals, evecs = torch.linalg.eigh(cov.double())
        filt = (evecs.T / torch.sqrt(evals.clamp_min(0) + eps)[:, None]).float()  # rows: whitening directions
        filt = filt.reshape(-1, c, k, k)  # the unfold order is (C, kh, kw)
        self.whiten.weight.copy_(torch.cat([filt, -filt]))
        self.whiten.bias.zero_()
        self.whitened.fill_(True)

    def param_groups(self) -> list[dict]:
        """Parameter groups with learning-rate scales (the paper's bias_scaler for batch-norm biases)."""
        bn_bias = [m.bias for m in self.modules() if isinstance(m, nn.BatchNorm2d)]
        ids = {id(p) for p in bn_bias}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "lr_scale": 1.0}, {"params": bn_bias, "lr_scale": self.bias_scale}]

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten(self.norm(x)))
        return self.block3(self.block2(self.block1(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.conv_features(x), dim=(2, 3))

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.tta:
            return self.head(self.features(x))
        both = self.head(self.features(torch.cat([x, x.flip(-1)])))
        return 0.5 * (both[: x.shape[0]] + both[x.shape[0]:])
