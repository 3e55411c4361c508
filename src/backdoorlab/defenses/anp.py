"""Repairer ``anp``: adversarial neuron pruning.

Paper: D. Wu, Y. Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021
(arXiv:2110.14430).

Each neuron k gets a mask ``m_k`` in [0, 1] on its weight and adversarial multiplicative
perturbations ``delta_k`` (weight) and ``xi_k`` (bias), both in [-eps, eps]: the neuron computes
``(m_k + delta_k) w_k . x + (1 + xi_k) b_k``. On the defender's clean set, each iteration takes
one signed-gradient ascent step of the perturbations (from a random start) and one SGD step of the
masks on ``alpha L(m, 0) + (1 - alpha) L(m + delta, xi)``; masks are clipped to [0, 1]. Neurons
whose mask ends below ``threshold`` (0.2) are pruned: their weight is set to zero (the paper's
pruning by mask value; the bias stays, as in the paper's neuron).

Neurons, found from the model's graph (:mod:`backdoorlab.defenses._surgery`) for any model (our
architectures, TorchScript, ``torch.export``):
- a convolution followed directly by a batch norm: the batch norm's channel (scale ``w_k`` =
  gamma, shift ``b_k`` = beta), as in the paper's code;
- a convolution without one (e.g. the MNIST ``cnn``): the convolution's output channel itself
  (its kernel and bias), i.e. a per-channel multiplicative mask on the convolution output;
- with ``linear`` (default on), also the output neurons of every linear layer but the classifier,
  and the *inputs* of the first linear layer when it is not the classifier (on a network that
  flattens its last conv block, every (channel, position) neuron: a corner patch drives the
  neurons of one position across channels busy elsewhere, which no channel mask isolates; see
  docs/repair-and-strip.md on fine-pruning's neurons).

Deviations, and why:
- *Budget*: ``iterations`` 2,000 at batch 128 (the paper's), mask ``lr`` 0.2 with momentum 0.9,
  ``eps`` 0.4, ``alpha`` 0.2 (the paper's values); the perturbation step is ``eps`` (one step, the
  paper's ``anp_steps`` 1 with its step size 0.2 on eps 0.4 from a random start). About 2.5 min on
  the full-MNIST ``cnn`` on 2 CPU cores; on CIFAR-10 models lower it (300 took 21 min on fastnet).
- ``fraction`` (optional) prunes that share of the neurons with the smallest masks instead of
  the threshold.
- *Accuracy guard* (``tolerance``, 0.02): of the neurons the threshold (or fraction) selects, only
  the smallest-mask ones are pruned, as many as keep the held-out accuracy within ``tolerance`` of
  the unpruned model's (binary search over the count, in mask order). The paper picks its threshold
  by hand from ACC / ASR curves. With the paper's 2,000 iterations the threshold alone cut a
  full-MNIST WaNet victim to CA 0.63 (docs/repairers.md). ``tolerance: null`` prunes every selected
  neuron (the paper's rule).

``repair(model, clean, *, evaluate=None)``: ``evaluate`` only adds CA / ASR to the curve.
Measurements: docs/repairers.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass as plain_dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import nn

from backdoorlab.defenses._pruning_ops import _CONFIG, _CurveHooks
from backdoorlab.defenses._surgery import Surgery, perturbed
from backdoorlab.defenses.base import DEFENSES, Evaluate, RepairResult, Repairer
from backdoorlab.defenses.fine_tuning import start_repair, two_row_result
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

log = logging.getLogger(__name__)


@plain_dataclass
class _Neurons:
    """One layer's neurons: the tensor scaled by the mask (first dim = neurons) and the bias."""

    name: str
    scale: str
    bias: Optional[str]
    n: int
    dim: int = 0  # the neurons' dimension of ``scale``: 0 its outputs, 1 a linear layer's inputs


def neuron_layers(s: Surgery, linear: bool = True) -> list[_Neurons]:
    out = []
    for u in s.units:
        if u.gated:
            out.append(_Neurons(u.gate_weight or u.name, u.gate_weight, u.gate_bias, u.channels))  # type: ignore[arg-type]
        else:
            out.append(_Neurons(u.name, u.weight, u.bias, u.channels))
    if linear:
        for w, b, n in s.linears[:-1]:  # every linear layer but the classifier
            if w:
                out.append(_Neurons(w, w, b, n))
        if s.linears and s.linears[0][0] and len(s.linears) > 1:
            w = s.linears[0][0]  # the first linear layer's inputs: the flattened conv block's neurons
            out.append(_Neurons(w + "[inputs]", w, None, int(s.tensor(w).shape[1]), dim=1))
    if not out:
        raise BackdoorLabError("ANP found no neurons to mask (no convolution, no hidden linear layer); use fine-tuning or i-bau")
    return out


def prune_smallest(s: Surgery, layers: list[_Neurons], base: dict[str, torch.Tensor], order: torch.Tensor,
                   k: int) -> dict[str, int]:
    """Set ``s``'s masked tensors to ``base`` (their unpruned values), then zero the ``k`` neurons first
    in ``order`` (indices into the layers' neurons, concatenated in order); returns the count per layer."""
    n = sum(ly.n for ly in layers)
    c_all = torch.zeros(n, dtype=torch.bool)
    c_all[order[:k]] = True
    out: dict[str, int] = {}
    with torch.no_grad():
        for ly in layers:
            s.tensor(ly.scale).copy_(base[ly.scale])
        start = 0
        for ly in layers:
            c = c_all[start:start + ly.n]
            start += ly.n
            if c.any():
                t = s.tensor(ly.scale)
                if ly.dim == 0:
                    t[c] = 0.0
                else:
                    t[:, c] = 0.0
                out[ly.name] = out.get(ly.name, 0) + int(c.sum())
    return out


def _shape(t: torch.Tensor, v: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return v.view(-1, *([1] * (t.dim() - 1))) if dim == 0 else v.view(1, -1)


@DEFENSES.register("anp", "adversarial neuron pruning (Wu & Wang 2021): masks robust to adversarial neuron perturbation, prune small masks")
@dataclass(frozen=True, config=_CONFIG)
class ANP(_CurveHooks, Repairer):
    """Optimise neuron masks under adversarial neuron perturbation; prune the neurons with small masks."""

    iterations: int = Field(2000, ge=1, le=100_000, description="mask optimisation steps (the paper's 2,000)")
    eps: float = Field(0.4, gt=0, le=1, description="bound of the multiplicative neuron perturbations")
    alpha: float = Field(0.2, ge=0, le=1, description="weight of the natural (unperturbed) loss")
    mask_lr: float = Field(0.2, gt=0)
    threshold: float = Field(0.2, ge=0, le=1, description="prune neurons whose mask ends below this")
    fraction: Optional[float] = Field(None, ge=0, lt=1, description="prune this share of the neurons instead (smallest masks)")
    linear: bool = Field(True, description="also mask the neurons of hidden linear layers")
    tolerance: Optional[float] = Field(0.02, ge=0, le=1, description="prune only as many of the selected neurons "
                                       "(smallest masks first) as keep the held-out accuracy within this of the "
                                       "unpruned model's (None: all of them, the paper)")
    tune_batch_size: int = Field(128, ge=1)
    batch_size: int = Field(256, ge=1, description="evaluation batch size")
    seed: int = Field(0, ge=0)

    def repair(self, model: nn.Module, clean: ImageSet, *, evaluate: Evaluate | None = None) -> RepairResult:
        from backdoorlab.data.loader import TensorLoader

        ev, net, before = start_repair(model, clean, evaluate, self.batch_size)
        s = Surgery(net, clean.float_batch(slice(0, 8)))
        layers = neuron_layers(s, self.linear)
        for p in net.parameters():
            p.requires_grad_(False)
        base = {ly.scale: s.tensor(ly.scale).detach().clone() for ly in layers}
        scales: dict[str, list[int]] = {}
        for i, ly in enumerate(layers):
            scales.setdefault(ly.scale, []).append(i)
        base.update({ly.bias: s.tensor(ly.bias).detach().clone() for ly in layers if ly.bias is not None})
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        masks = [torch.ones(ly.n, requires_grad=True) for ly in layers]
        opt = torch.optim.SGD(masks, lr=self.mask_lr, momentum=0.9)
        loader = TensorLoader(clean.x, clean.y, self.tune_batch_size, shuffle=True, generator=g)

        def forward(x: torch.Tensor, noise: list[tuple[torch.Tensor, torch.Tensor]] | None) -> torch.Tensor:
            over = {}
            for name, idx in scales.items():  # a tensor may carry output and input neurons
                w = base[name]
                for i in idx:
                    m = masks[i] if noise is None else masks[i] + noise[i][0]
                    w = w * _shape(w, m, layers[i].dim)
                over[name] = w
            for i, ly in enumerate(layers):
                if ly.bias is not None and noise is not None:
                    b = base[ly.bias]
                    over[ly.bias] = b * _shape(b, 1 + noise[i][1])
            return perturbed(s.net, over, x)

        it, done = iter(loader), 0
        net.eval()  # the paper's masks are trained with the model's batch-norm statistics
        while done < self.iterations:
            try:
                xb, yb = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            xb = xb.contiguous()
            noise = []
            for ly in layers:  # random start, one signed ascent step of size eps, projected
                d = ((torch.rand(ly.n, generator=g) * 2 - 1) * self.eps).requires_grad_(True)
                e = ((torch.rand(ly.n, generator=g) * 2 - 1) * self.eps).requires_grad_(True)
                noise.append((d, e))
            if self.alpha < 1:
                adv = -F.cross_entropy(forward(xb, noise), yb)
                grads = torch.autograd.grad(adv, [t for pair in noise for t in pair], allow_unused=True)
                with torch.no_grad():
                    new = []
                    for i, (d, e) in enumerate(noise):
                        gd, ge = grads[2 * i], grads[2 * i + 1]
                        # ascent of the loss: descend -loss's gradient sign
                        d2 = (d - self.eps * (gd.sign() if gd is not None else 0)).clamp(-self.eps, self.eps)
                        e2 = (e - self.eps * (ge.sign() if ge is not None else 0)).clamp(-self.eps, self.eps)
                        new.append((d2, e2))
                noise = new
            opt.zero_grad(set_to_none=True)
            loss = self.alpha * F.cross_entropy(forward(xb, None), yb)
            if self.alpha < 1:
                loss = loss + (1 - self.alpha) * F.cross_entropy(forward(xb, noise), yb)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for m in masks:
                    m.clamp_(0, 1)
            done += 1
        flat = torch.cat([m.detach() for m in masks])
        order = torch.argsort(flat, stable=True)  # smallest masks first
        selected = int(round(self.fraction * flat.numel())) if self.fraction is not None else int((flat < self.threshold).sum())

        def prune(k: int) -> dict[str, int]:
            return prune_smallest(s, layers, base, order, k)

        k = selected
        if self.tolerance is not None and selected:
            from backdoorlab.train import evaluate as accuracy

            floor = before["holdout_accuracy"] - self.tolerance - 1e-12

            def within(n: int) -> bool:
                prune(n)
                return accuracy(net, clean, self.batch_size) >= floor

            if not within(selected):  # the largest count within tolerance, by bisection in mask order
                lo, hi = 0, selected
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if within(mid) else (lo, mid)
                k = lo
                log.info("anp: %d neurons selected by %s, %d pruned (held-out accuracy within %g)", selected,
                         f"fraction {self.fraction:g}" if self.fraction is not None else f"mask < {self.threshold:g}",
                         k, self.tolerance)
        pruned = prune(k)
        for p in net.parameters():
            p.requires_grad_(True)
        return two_row_result("anp", net, before, ev(net), pruned_fraction=k / flat.numel(), pruned=k, selected=selected,
                              pruned_by_layer=pruned, neurons=int(flat.numel()), layer=",".join(ly.name for ly in layers),
                              mask_values=flat.tolist())
