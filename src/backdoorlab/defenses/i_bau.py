"""Repairer ``i-bau``: implicit backdoor adversarial unlearning.

Paper: Y. Zeng, S. Chen, W. Park, Z. M. Mao, M. Jin, R. Jia, "Adversarial Unlearning of Backdoors
via Implicit Hypergradient", ICLR 2022 (arXiv:2110.03735).

The minimax problem ``min_theta max_{||delta|| <= r} L(theta, x + delta, y)`` over the defender's
clean set, with ``delta`` one *universal* perturbation (the stand-in for an unknown trigger).
Each round: the inner problem is solved approximately (``inner_steps`` steps of normalised
gradient ascent on ``delta`` over clean batches, projected on the L2 ball of radius
``eps * sqrt(C H W)``); then, batch by batch, the model takes an SGD step along the implicit
hypergradient of ``psi(theta) = L_outer(theta, delta*(theta))``:

    d psi / d theta = d_theta L_outer + (d_theta Phi)^T v,   v = (I - d_delta Phi)^-T d_delta L_outer,

with ``Phi(delta, theta) = delta + alpha * grad_delta L_inner`` the inner ascent map, whose fixed
point is ``delta*``. ``v`` is approximated by the truncated Neumann series
``sum_{k<=K} (d_delta Phi)^T^k d_delta L_outer`` (``neumann`` K terms, each one Hessian-vector
product by double back-propagation), as the paper's fixed-point solver does.

Deviations, and why:
- *Outer loss*: cross-entropy on the perturbed images plus ``clean_weight`` (1) times that on the
  clean ones (the paper: perturbed only); the clean term keeps CA on the small clean sets of a CPU
  budget.
- *Random start*: the perturbation starts from non-negative noise of half the radius (the paper:
  from zero). From zero, gradient ascent barely moves pixels that are black in every clean image (the
  corner where an MNIST patch acts): the neurons there are nearly silent on clean images.
- *Step of the ascent map*: ``alpha`` is capped on each batch at half the inverse of the inner
  Hessian's spectral radius (two power iterations), so that the Neumann series converges; the
  paper fixes it.
- *Block starts* (``block_starts``, off by default): the inner problem is not concave, and on the
  full-MNIST BadNets victim its ascent stalls far from the trigger (clean loss 2.1 after 100 steps at
  the full radius, against 16.0 for the true 3x3 corner patch, which lies inside the ball); with the
  true trigger as the inner solution the same outer unlearning removes the backdoor
  (``benchmarks/bench_repair_ceiling.py``). With the option, each round also ascends a second
  perturbation from the loudest of uniform square blocks tiling the image (a restart, as in PGD with
  restarts, with the prior that a trigger may be local), and the outer steps alternate between the two
  (the noise-started one keeps finding what it found before, e.g. a warp).
- *Clipping*: the hypergradient's global norm is clipped at ``max_grad_norm`` (10) before the SGD
  step. On the full-CIFAR fastnet victim the first outer loss was 44 nats (a confident model under
  its universal perturbation) with a gradient norm of 465; one step at lr 0.01 sent the loss to
  6,107 and the next hypergradient overflowed. The paper's Adam bounds each step in its own way.
- *Budget*: ``rounds`` 5 rounds, 5 inner steps, K = 3 Neumann terms, SGD from ``lr`` 0.01 (the
  paper: Adam, more inner steps); the hypergradient is taken on each batch around the universal
  ``delta`` of the round.

Works on any differentiable model (our architectures, TorchScript, ``torch.export``): it needs
only input gradients and trainable parameters. ``repair(model, clean, *, evaluate=None)``:
``evaluate`` only adds CA / ASR to the curve. Measurements: docs/repairers.md.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import nn

from backdoorlab.defenses._pruning_ops import _CONFIG, _CurveHooks
from backdoorlab.defenses._surgery import trainable
from backdoorlab.defenses.base import DEFENSES, Evaluate, RepairResult, Repairer
from backdoorlab.defenses.fine_tuning import start_repair, two_row_result
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet


def block_starts(shape: tuple[int, ...], radius: float) -> torch.Tensor:
    """Square blocks of +1 and of -1 on every channel, side ``radius / sqrt(C)`` (inside the L2 ball; at
    most a quarter of the image), at a stride of half a side, the last row and column flush with the
    image's edges: (2 x blocks, C, H, W)."""
    c, h, w = shape
    side = max(1, min(int(radius / math.sqrt(c)), h // 4 or 1, w // 4 or 1))
    step = max(1, side // 2)  # overlapping by half a block: a trigger of the block's size is mostly inside one
    ys = sorted({*range(0, h - side + 1, step), h - side})
    xs = sorted({*range(0, w - side + 1, step), w - side})
    out = torch.zeros(len(ys) * len(xs), c, h, w)
    for i, (y0, x0) in enumerate((y0, x0) for y0 in ys for x0 in xs):
        out[i, :, y0:y0 + side, x0:x0 + side] = 1.0
    return torch.cat([out, -out])


def _project(delta: torch.Tensor, radius: float) -> torch.Tensor:
    n = delta.norm()
    return delta * (radius / n) if n > radius else delta


@DEFENSES.register("i-bau", "i-BAU (Zeng et al. 2022): unlearn a universal adversarial perturbation by implicit hypergradient")
@dataclass(frozen=True, config=_CONFIG)
class IBAU(_CurveHooks, Repairer):
    """Minimax unlearning of a universal perturbation with an implicit hypergradient."""

    rounds: int = Field(5, ge=1, le=1000, description="rounds (one inner solve, then one pass over the clean set)")
    inner_steps: int = Field(5, ge=1, le=1000, description="ascent steps of the universal perturbation per round")
    inner_lr: float = Field(0.1, gt=0, description="ascent step, as a share of the ball radius")
    eps: float = Field(0.15, gt=0, le=1, description="L2 radius of the perturbation / sqrt(C*H*W) (per-pixel RMS)")
    alpha: float = Field(0.1, gt=0, description="step of the inner ascent map Phi in the hypergradient")
    neumann: int = Field(3, ge=0, le=50, description="Neumann terms approximating (I - d Phi / d delta)^-1")
    clean_weight: float = Field(1.0, ge=0, description="weight of the clean cross-entropy in the outer loss")
    random_start: bool = Field(True, description="start the perturbation from non-negative noise of half the radius")
    block_starts: bool = Field(False, description="each round, a second universal perturbation ascended from the "
                               "loudest of uniform square blocks (+1 and -1, tiling the image, as large as the ball "
                               "allows); the outer steps alternate between the two perturbations")
    max_grad_norm: Optional[float] = Field(
        10.0, gt=0, description="clip the hypergradient's global norm to this (None: no clipping)")
    lr: float = Field(0.01, gt=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    tune_batch_size: int = Field(128, ge=1)
    batch_size: int = Field(256, ge=1, description="evaluation batch size")
    seed: int = Field(0, ge=0)

    def repair(self, model: nn.Module, clean: ImageSet, *, evaluate: Evaluate | None = None) -> RepairResult:
        from backdoorlab.data.loader import TensorLoader

        ev, net, before = start_repair(model, clean, evaluate, self.batch_size)
        params = trainable(net)
        g = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        loader = TensorLoader(clean.x, clean.y, self.tune_batch_size, shuffle=True, generator=g)
        radius = self.eps * math.sqrt(math.prod(clean.shape))
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                              nesterov=self.momentum > 0)
        total, step = self.rounds * len(loader), 0
        delta = torch.zeros(1, *clean.shape)
        if self.random_start:  # non-negative noise of half the radius: it lifts dark pixels, so neurons that
            # are nearly silent on clean images (where a corner patch acts) get some gradient
            delta = torch.rand(1, *clean.shape, generator=g)
            delta = delta * (0.5 * radius / delta.norm())
        history = []
        net.eval()  # batch-norm statistics stay those of the model (perturbed batches would shift them)
        blocks = block_starts(clean.shape, radius) if self.block_starts else None
        for _ in range(self.rounds):
            delta = self._inner(net, loader, delta, radius)
            current = [delta]
            if blocks is not None:  # a second perturbation: ascended from the loudest block on one batch
                xb, yb = next(iter(loader))
                current.append(self._inner(net, loader, self._best_start(net, xb, yb, blocks), radius))
            losses = []
            for i, (xb, yb) in enumerate(loader):
                for gr in opt.param_groups:
                    gr["lr"] = 0.5 * self.lr * (1 + math.cos(math.pi * step / total))
                loss = self._hypergradient(net, params, xb.contiguous(), yb, current[i % len(current)])
                opt.step()
                losses.append(loss)
                step += 1
            history.append({"loss": sum(losses) / max(1, len(losses)), "delta_norm": float(delta.norm())})
        net.eval()
        return two_row_result("i-bau", net, before, ev(net), rounds=history, radius=radius)

    def _inner(self, net: nn.Module, loader, delta: torch.Tensor, radius: float) -> torch.Tensor:
        """Normalised gradient ascent of the clean loss on one universal perturbation."""
        delta = delta.clone()
        it = iter(loader)
        for _ in range(self.inner_steps):
            try:
                xb, yb = next(it)
            except StopIteration:
                it = iter(loader)
                xb, yb = next(it)
            d = delta.clone().requires_grad_(True)
            loss = F.cross_entropy(net((xb + d).clamp(0, 1)), yb)
            (grad,) = torch.autograd.grad(loss, d)
            delta = _project(delta + self.inner_lr * radius * grad / grad.norm().clamp_min(1e-12), radius)
        return delta.detach()

    @staticmethod
    def _best_start(net: nn.Module, x: torch.Tensor, y: torch.Tensor, starts: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """The start (one of ``starts``, (M, C, H, W)) with the largest clean loss on the batch ``x``, (1, C, H, W)."""
        losses = []
        with torch.no_grad():
            for i in range(0, len(starts), chunk):
                d = starts[i:i + chunk]
                xs = (x.unsqueeze(0) + d.unsqueeze(1)).clamp(0, 1).flatten(0, 1)
                ce = F.cross_entropy(net(xs), y.repeat(len(d)), reduction="none")
                losses.append(ce.view(len(d), -1).mean(1))
        return starts[int(torch.cat(losses).argmax())].unsqueeze(0).clone()

    def _alpha(self, hvp, g: torch.Tensor) -> float:
        """``alpha``, capped at ``0.5 / rho`` with ``rho`` the Hessian's spectral radius estimated by
        two power iterations from ``g``: the Neumann series converges only when every eigenvalue of
        ``I + alpha H`` is below 1 in magnitude. (The full-CIFAR fastnet victim: rho ~ 400, the
        terms grew 40x each at alpha 0.1 and the hypergradient overflowed.)"""
        if self.neumann == 0:
            return self.alpha
        u = g / g.norm().clamp_min(1e-12)
        rho = 0.0
        for _ in range(2):
            hu = hvp(u)
            rho = float(hu.norm())
            if not math.isfinite(rho):
                raise BackdoorLabError("i-BAU: the inner loss's Hessian is not finite at this perturbation; lower eps")
            u = hu / max(rho, 1e-12)
        return min(self.alpha, 0.5 / max(rho, 1e-12))

    def _hypergradient(self, net: nn.Module, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                       delta: torch.Tensor) -> float:
        """Set ``p.grad`` of every parameter to the implicit hypergradient at ``delta``; returns the outer loss."""
        d = delta.clone().requires_grad_(True)
        outer = F.cross_entropy(net((x + d).clamp(0, 1)), y)
        if self.clean_weight > 0:
            outer = outer + self.clean_weight * F.cross_entropy(net(x), y)
        g_theta = torch.autograd.grad(outer, params, retain_graph=True, allow_unused=True)
        (g_delta,) = torch.autograd.grad(outer, d)
        # Phi(delta, theta) = delta + alpha * grad_delta L_inner(theta, delta)
        d2 = delta.clone().requires_grad_(True)
        inner = F.cross_entropy(net((x + d2).clamp(0, 1)), y)
        (gi,) = torch.autograd.grad(inner, d2, create_graph=True)

        def hvp(u: torch.Tensor) -> torch.Tensor:  # H u, H the inner loss's Hessian in delta
            return torch.autograd.grad(gi, d2, grad_outputs=u, retain_graph=True)[0]

        alpha = self._alpha(hvp, g_delta)
        v, p = g_delta, g_delta
        for _ in range(self.neumann):  # v = sum_k (d Phi / d delta)^T^k g_delta, d Phi / d delta = I + alpha H
            p = p + alpha * hvp(p)
            v = v + p
        indirect = torch.autograd.grad(gi, params, grad_outputs=alpha * v, allow_unused=True)  # d Phi / d theta = alpha d gi / d theta
        grads = []
        for prm, a, b in zip(params, g_theta, indirect):
            gsum = (a if a is not None else 0) + (b if b is not None else 0)
            if isinstance(gsum, int):
                prm.grad = None
                continue
            if not torch.isfinite(gsum).all():
                raise BackdoorLabError("i-BAU's hypergradient is not finite; lower alpha or eps")
            prm.grad = gsum.detach()
            grads.append(prm)
        if self.max_grad_norm is not None and grads:
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        return float(outer.detach())
