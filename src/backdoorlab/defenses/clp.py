"""Repairer ``clp``: data-free channel Lipschitzness-based pruning.

Paper: R. Zheng, R. Tang, J. Li, L. Liu, "Data-free Backdoor Removal based on Channel
Lipschitzness", ECCV 2022 (arXiv:2208.03111).

For every convolution, each output channel k gets an upper bound of its Lipschitz constant (the
UCLC): the spectral norm of its kernel ``W_k`` reshaped to (C_in, kh * kw), times ``|gamma_k| /
sqrt(var_k + eps)`` of the batch norm that normalises it. Within each layer, channels whose UCLC
exceeds ``mean + u * std`` (``u`` 3) of the layer's UCLCs are pruned: zeroed (the kernel and
bias, and the directly following batch norm's scale and shift). No data at all: ``clean`` may be
None (it is only used, when given, to report accuracy on it).

Layers are found from the model's graph (:mod:`backdoorlab.defenses._surgery`), for our
architectures, TorchScript files and ``torch.export`` programs alike. Convolutions not directly
followed by a batch norm:
- in a pre-activation ResNet the convolution feeds a residual sum that the next block's batch norm
  normalises: the nearest batch norm downstream over the same channels (through ReLU, pooling, the
  sum, dropout) is folded in; the convolution's own kernel and bias are pruned (that batch norm
  also carries the shortcut, so it is left as is);
- with no batch norm downstream (e.g. the MNIST ``cnn``, the last convolution of a ResNet), the
  kernel alone: its spectral norm is the channel's Lipschitz bound up to the bias.

Deviations: none in the method (the bound uses ``|gamma| / sqrt(var + eps)``, the BN's per-channel
scale). ``repair(model, clean, *, evaluate=None)`` with ``clean`` None or a clean set:
``evaluate`` only adds CA / ASR to the curve. Measurements: docs/repairers.md.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import nn

from backdoorlab.defenses._pruning_ops import _CONFIG, _check_sets, _CurveHooks, _Evaluator
from backdoorlab.defenses._surgery import Surgery, model_copy
from backdoorlab.defenses.base import DEFENSES, Evaluate, RepairResult, Repairer
from backdoorlab.defenses.fine_tuning import two_row_result
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet


@torch.no_grad()
def channel_lipschitz(s: Surgery) -> dict[str, torch.Tensor]:
    """UCLC (out_channels,) of every convolution of ``s``, by unit name."""
    out = {}
    for u in s.require_convs("CLP"):
        w = s.tensor(u.weight).detach().float()
        bound = torch.linalg.matrix_norm(w.reshape(w.shape[0], w.shape[1], -1), ord=2)
        bn = s.following_bn(u)
        if bn is not None:
            gamma, var = (s.tensor(n).detach().float() for n in bn)
            eps = u.gate_eps if u.gated else 1e-5
            bound = bound * gamma.abs() / torch.sqrt(var + eps)
        out[u.name] = bound
    return out


@DEFENSES.register("clp", "channel Lipschitzness pruning (Zheng et al. 2022): data-free, prune channels with outlying Lipschitz bounds")
@dataclass(frozen=True, config=_CONFIG)
class CLP(_CurveHooks, Repairer):
    """Prune, in every convolution, the channels whose Lipschitz upper bound is an outlier (data-free)."""

    u: float = Field(3.0, gt=0, description="prune channels with UCLC > mean + u * std of their layer")
    batch_size: int = Field(256, ge=1, description="evaluation batch size")

    def repair(self, model: nn.Module, clean: ImageSet, *, evaluate: Evaluate | None = None) -> RepairResult:
        """``clean`` may be None: CLP needs no data (when given, it only reports accuracy on it)."""
        if clean is not None:
            _check_sets(model, clean)
        t0 = time.perf_counter()
        net = model_copy(model)
        shape = getattr(model, "input_shape", None)
        if clean is not None:
            probe = clean.float_batch(slice(0, 2))
        elif shape is not None:
            probe = torch.zeros(2, *shape)
        else:
            raise BackdoorLabError("CLP without clean data needs a model that knows its input shape (input_shape)")
        seconds_pruning = self._prune(net, probe)
        seconds = time.perf_counter() - t0
        if clean is None:
            before = dict(evaluate(model)) if evaluate is not None else {}
            after = dict(evaluate(net)) if evaluate is not None else {}
        else:
            ev = _Evaluator(clean, evaluate, self.batch_size)
            before, after = ev(model), ev(net)
        return two_row_result("clp", net, before, after, seconds_data_free=seconds, **seconds_pruning)

    def _prune(self, net: nn.Module, probe: torch.Tensor) -> dict[str, Any]:
        s = Surgery(net, probe)
        uclc = channel_lipschitz(s)
        pruned: dict[str, int] = {}
        total = 0
        for unit in s.units:
            v = uclc[unit.name]
            total += v.numel()
            if v.numel() < 2:
                continue
            cut = v > v.mean() + self.u * v.std()
            if cut.any():
                s.silence(unit, torch.nonzero(cut).flatten())
                pruned[unit.name] = int(cut.sum())
        n = sum(pruned.values())
        return {"pruned": n, "pruned_fraction": n / max(1, total), "pruned_by_layer": pruned, "channels": total,
                "layer": ",".join(pruned)}
