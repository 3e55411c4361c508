"""Repairer ``nad``: Neural Attention Distillation.

Paper: Y. Li, X. Lyu, N. Koren, L. Lyu, B. Li, X. Ma, "Neural Attention Distillation: Erasing
Backdoor Triggers from Deep Neural Networks", ICLR 2021 (arXiv:2101.05930).

Algorithm: a *teacher* is the backdoored model fine-tuned on the defender's clean set (the
``fine-tuning`` repairer's fine-tuning); the *student*, a copy of the backdoored model, is then
fine-tuned on the same clean set with cross-entropy plus ``beta`` times the attention distillation
loss at chosen layers: the attention map of activations a (C, H, W) is ``mean_c |a_c|^p`` (p = 2),
flattened and L2-normalised, and the loss is the squared distance between the student's and the
teacher's maps. The student is returned.

Deviations, and why:
- *Which layers*: the paper distils at the ends of the residual groups of a WideResNet. Here, for
  any model (our architectures, TorchScript, ``torch.export``; found from its graph by
  :mod:`backdoorlab.defenses._surgery`): the last convolution of each of the last ``layers`` (3)
  feature-map resolutions, taken at its batch norm's output when one directly follows it, after a
  ReLU. On a ResNet these are the group ends; on the 2-conv MNIST CNN, both convolutions.
- *Loss scale*: the squared distance of the normalised maps averaged over positions (not the
  paper's unsquared norm), with ``beta`` 500: at the paper's 5000 the student of the MNIST ``cnn``
  (no batch norm) collapsed to one class at lr 0.1 (CA 0.11); at 500 and 50 it kept CA.
- *Budget* (CPU): teacher and student ``epochs`` 5 each with SGD from ``lr`` 0.1 (the paper's rate),
  cosine schedule after a 0.3-epoch warm-up, the student's gradient norm clipped at 5 (without it the
  batch-norm-free MNIST ``cnn`` diverged once at this rate) (the paper: 10 + 20 epochs on a WideResNet). The
  teacher is fine-tuned at that rate too: at the ``fine-tuning`` repairer's 0.01 it keeps the
  backdoor, and so does the student.
- *Augmentation*: teacher and student see random crops with 1 pixel of padding (``crop_padding``; the
  paper fine-tunes with its training augmentation). At lr 0.1 on a few thousand images it cuts what
  NAD costs a clean model by about a third (chosen on seed-1 victims, docs/repairers.md).

``repair(model, clean, *, evaluate=None)``: ``evaluate`` only adds CA / ASR to the curve. The input
model is not modified. Measurements: docs/repairers.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import nn

from backdoorlab.defenses._pruning_ops import _CONFIG, _CurveHooks
from backdoorlab.defenses._surgery import ConvUnit, Surgery, model_copy, tune
from backdoorlab.defenses.base import DEFENSES, Evaluate, RepairResult, Repairer
from backdoorlab.defenses.fine_tuning import start_repair, _fine_tune, _TuneParams, two_row_result
from backdoorlab.types import ImageSet


def attention(a: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(B, H*W) L2-normalised attention maps ``mean_c |a_c|^p`` of activations (B, C, H, W)."""
    return F.normalize(a.float().abs().pow(p).mean(1).flatten(1), dim=1)


def distill_layers(s: Surgery, layers: int) -> list[ConvUnit]:
    """The last convolution of each of the last ``layers`` feature-map resolutions."""
    units = s.require_convs("NAD")
    last: dict[tuple[int, int], ConvUnit] = {}
    for u in units:
        last.pop(u.size, None)
        last[u.size] = u  # insertion order: the resolutions in order of their last convolution
    return list(last.values())[-layers:]


@DEFENSES.register("nad", "neural attention distillation (Li et al. 2021): a fine-tuned teacher's attention maps guide the student")
@dataclass(frozen=True, config=_CONFIG)
class NAD(_CurveHooks, _TuneParams, Repairer):
    """Fine-tune a teacher, then fine-tune the student with attention distillation to it."""

    lr: float = Field(0.1, gt=0, le=1, description="teacher and student learning rate (the paper's)")
    beta: float = Field(500.0, ge=0, description="weight of the attention distillation loss")
    power: float = Field(2.0, gt=0, description="p of the attention map mean_c |a_c|^p")
    layers: int = Field(3, ge=1, le=16, description="distil at the last conv of this many last resolutions")
    student_epochs: int = Field(5, ge=1, le=1000)
    crop_padding: int = Field(1, ge=0, description="random-crop augmentation of teacher and student (0: off)")
    batch_size: int = Field(256, ge=1, description="evaluation batch size")

    def repair(self, model: nn.Module, clean: ImageSet, *, evaluate: Evaluate | None = None) -> RepairResult:
        ev, base, before = start_repair(model, clean, evaluate, self.batch_size)
        teacher, hist = _fine_tune(self, base, clean, None)
        probe = clean.float_batch(slice(0, 8))
        st = Surgery(teacher, probe)
        units = distill_layers(st, self.layers)
        names = [u.name for u in units]
        t_tap = st.tap([u.gate_node for u in units])
        student = model_copy(model)
        ss = Surgery(student, probe)
        by_name = {u.name: u for u in ss.units}
        s_tap = ss.tap([by_name[n].gate_node for n in names])
        for p in teacher.parameters():
            p.requires_grad_(False)

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits, feats = s_tap(x)
            with torch.no_grad():
                _, t_feats = t_tap(x)
            at = sum(((attention(F.relu(a), self.power) - attention(F.relu(b), self.power)) ** 2).mean()
                     for a, b in zip(feats, t_feats))
            return F.cross_entropy(logits, y) + self.beta * at

        from backdoorlab.data.loader import Augment

        losses = tune(student, clean, loss, epochs=self.student_epochs, lr=self.lr, batch_size=self.tune_batch_size,
                      momentum=self.momentum, weight_decay=self.weight_decay, seed=self.seed,
                      augment=Augment(self.crop_padding, self.flip))
        if self.recalibrate_bn:
            from backdoorlab.train import recalibrate_bn

            recalibrate_bn(student, clean, seed=self.seed)
        return two_row_result("nad", student, before, ev(student), layer=",".join(names), teacher_history=hist,
                              student_losses=losses, teacher=ev(teacher))
