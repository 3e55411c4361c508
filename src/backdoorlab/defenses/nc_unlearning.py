"""Repairer ``nc-unlearning``: Neural Cleanse's mitigation by unlearning.

Paper: B. Wang, Y. Yao, S. Shan, H. Li, B. Viswanath, H. Zheng, B. Y. Zhao, "Neural Cleanse:
Identifying and Mitigating Backdoor Attacks in Neural Networks", IEEE S&P 2019, Section VI.C
(unlearning), as BackdoorBench runs it (Wu et al. 2022).

The ``neural-cleanse`` inspector (:mod:`backdoorlab.defenses.neural_cleanse`) reverse-engineers a
mask m and pattern p per target class on the clean set and flags the targets whose mask is an
outlier (MAD anomaly index > 2). If none is flagged, the model is returned unchanged (as
BackdoorBench does). Otherwise the model is fine-tuned on the clean set with a ``share`` (20%) of
each batch stamped with a flagged target's reversed trigger, ``(1 - m) x + m p``, keeping the
true labels: the model unlearns the trigger -> target association.

Deviations, and why:
- *Fine-tuning budget*: the fine-tuning baseline's (``epochs`` 5, SGD from ``lr`` 0.01, cosine
  schedule, batch-norm statistics re-estimated afterwards, as every fine-tuning repairer here); the
  share of stamped images is drawn afresh in every batch (the paper: a fixed 20% of the set, one
  stamped copy each), and with several flagged targets each stamped image takes one of their
  triggers at random.
- ``force`` (off) unlearns the trigger of the most anomalous target even when none is flagged.

Works on any model the inspector and fine-tuning take (our architectures, TorchScript,
``torch.export``). ``repair(model, clean, *, evaluate=None)``: ``evaluate`` only adds CA / ASR to
the curve. Measurements: docs/repairers.md.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import nn

from backdoorlab.defenses._pruning_ops import _CONFIG, _CurveHooks
from backdoorlab.defenses.base import DEFENSES, Evaluate, RepairResult, Repairer
from backdoorlab.defenses.fine_tuning import _fine_tune, start_repair, _TuneParams, two_row_result
from backdoorlab.types import ImageSet


@DEFENSES.register("nc-unlearning", "Neural Cleanse unlearning: fine-tune with the reversed trigger stamped on clean images, true labels")
@dataclass(frozen=True, config=_CONFIG)
class NCUnlearning(_CurveHooks, _TuneParams, Repairer):
    """Reverse-engineer triggers (Neural Cleanse); fine-tune with them stamped on correctly labelled clean images."""

    share: float = Field(0.2, gt=0, le=1, description="share of each batch stamped with a reversed trigger")
    images_per_class: int = Field(10, ge=1, description="Neural Cleanse: clean images per class")
    steps: int = Field(150, ge=1, description="Neural Cleanse: optimisation steps")
    threshold: float = Field(2.0, gt=0, description="Neural Cleanse: MAD anomaly index above which a target is flagged")
    force: bool = Field(False, description="unlearn the most anomalous target's trigger even when none is flagged")
    batch_size: int = Field(256, ge=1, description="evaluation batch size")

    def repair(self, model: nn.Module, clean: ImageSet, *, evaluate: Evaluate | None = None) -> RepairResult:
        from backdoorlab.defenses.neural_cleanse import NeuralCleanse

        ev, net, before = start_repair(model, clean, evaluate, self.batch_size)
        nc = NeuralCleanse(images_per_class=self.images_per_class, steps=self.steps, threshold=self.threshold,
                           seed=self.seed)
        found = nc.inspect(net, clean)
        targets = list(found.flagged_targets)
        if not targets and self.force:
            targets = [int(torch.nan_to_num(found.anomaly, nan=-1e9).argmax())]
        info: dict[str, Any] = {"flagged_targets": targets, "anomaly": [float(a) for a in found.anomaly]}
        if not targets:
            return two_row_result("nc-unlearning", net, before, dict(before), unlearned=False, **info)
        masks = found.details["masks"][targets]  # (T, 1, H, W)
        stamps = found.patterns[targets]  # (T, C, H, W) = m * p
        g = torch.Generator().manual_seed(self.seed + 1)

        def stamp(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pick = torch.rand(x.shape[0], generator=g) < self.share
            if not bool(pick.any()):
                return x, y
            which = torch.randint(0, len(targets), (int(pick.sum()),), generator=g)
            x = x.clone()
            x[pick] = (1 - masks[which]) * x[pick] + stamps[which]
            return x, y

        tuned, hist = _fine_tune(self, net, clean, None, transform=stamp)
        return two_row_result("nc-unlearning", tuned, before, ev(tuned), unlearned=True, history=hist, **info)
