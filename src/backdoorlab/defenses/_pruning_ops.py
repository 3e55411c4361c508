"""Pruning mechanics shared by the repairers ``pruning``, ``fine-pruning`` and ``fine-tuning``.

The layer to prune (:class:`PruneTarget`), the per-channel activations that rank its channels
(:func:`channel_activations`), the masks that zero them (:func:`channel_masks`,
:func:`weight_masks`, :func:`apply_masks`), the step fractions and rankings (:class:`_Pruner`),
the pruning curve, the held-out evaluation and the report hooks. The paper, the algorithms and
the deviations are documented beside the methods, in :mod:`backdoorlab.defenses.pruning`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, Optional

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass
from torch import nn

from backdoorlab.defenses.base import Evaluate, RepairResult
from backdoorlab.defenses.inference import inference_model
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

log = logging.getLogger("backdoorlab.defenses.pruning")  # the methods' logger

_CONFIG = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- the layer to prune
class PruneTarget:
    """The module whose output channels are pruned, and the BatchNorm2d fed by it (if any)."""

    def __init__(self, model: nn.Module, layer: str | None) -> None:
        from backdoorlab.defenses._surgery import is_foreign

        self.surgery: Any = None
        if is_foreign(model):
            self._from_graph(model, layer)
            return
        modules = dict(model.named_modules())
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise BackdoorLabError(f"the model ({type(model).__name__}) has no convolutional layer (nn.Conv2d) to prune; "
                                   "pruning defenses need a CNN")
        name = layer if layer is not None else getattr(model, "last_conv", "")
        if not name:
            raise BackdoorLabError("the model does not name its last convolutional layer (no `last_conv`); "
                                   f"give the layer to prune, one of: {', '.join(convs)}")
        if name not in modules:
            raise BackdoorLabError(f"layer {name!r} does not exist in the model; its convolutional layers: {', '.join(convs)}")
        mod = modules[name]
        if not isinstance(mod, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise BackdoorLabError(f"layer {name!r} is a {type(mod).__name__}; pruning needs a Conv2d or BatchNorm2d "
                                   f"(its output channels), e.g. one of: {', '.join(convs)}, or a Linear (its input "
                                   f"neurons){', e.g. ' + ', '.join(linears) if linears else ''}")
        self.name = name
        self.module = mod
        #: a Linear layer's *inputs* are pruned (the neurons it reads, e.g. every (channel, position) of a
        #: flattened conv block): column j of its weight is zeroed for pruned neuron j
        self.linear_inputs = isinstance(mod, nn.Linear)
        if self.linear_inputs:
            self.channels = int(mod.in_features)
        else:
            self.channels = int(mod.out_channels if isinstance(mod, nn.Conv2d) else mod.num_features)
        self.gate: str | None = None  # BatchNorm2d directly consuming the conv output

    def _from_graph(self, model: nn.Module, layer: str | None) -> None:
        """A foreign model (TorchScript, torch.export): its convolutions from its graph
        (:class:`~backdoorlab.defenses._surgery.Surgery`); ``layer`` names one by its weight's
        prefix (default: the last)."""
        from backdoorlab.defenses._surgery import Surgery, is_torchscript

        shape = getattr(model, "input_shape", None)
        if shape is None:
            raise BackdoorLabError(f"this {'TorchScript' if is_torchscript(model) else 'graph'} module does not know its "
                                   "input shape; load the model with backdoorlab.api.load_model (or wrap it in "
                                   "backdoorlab.models.io.ForeignModel) to prune it")
        s = Surgery(model, torch.zeros(2, *shape))
        units = s.require_convs("pruning")
        names = [u.name for u in units]
        if layer is not None and layer not in names:
            raise BackdoorLabError(f"layer {layer!r} is not a convolution of this model; its convolutions: {', '.join(names)}")
        unit = units[-1] if layer is None else units[names.index(layer)]
        self.surgery, self.unit = s, unit
        self.name, self.module, self.linear_inputs, self.channels = unit.name, None, False, unit.channels
        self.gate = None

    def param_names(self, weights_only: bool = False) -> list[str]:
        """Full parameter names zeroed for a pruned channel (conv weight/bias, gate BN weight/bias;
        a Linear layer's weight only: its bias belongs to its outputs)."""
        if self.surgery is not None:
            u, full = self.unit, self.surgery.full_name
            names = [u.weight] + ([] if weights_only else [n for n in (u.bias,) if n is not None])
            if self.gate is not None and not weights_only:
                names += [u.gate_weight, u.gate_bias]
            return [full(n) for n in names]
        names = [f"{self.name}.weight"]
        if not weights_only and not self.linear_inputs:
            if getattr(self.module, "bias", None) is not None:
                names.append(f"{self.name}.bias")
            if self.gate is not None:
                names += [f"{self.gate}.weight", f"{self.gate}.bias"]
        return names


@torch.inference_mode()
def channel_activations(model: nn.Module, target: PruneTarget, data: ImageSet, batch_size: int = 512) -> torch.Tensor:
    """Mean activation (C,) of each output channel of ``target`` over ``data``: the ReLU of the
    layer's output, or of the BatchNorm2d that directly consumes it, averaged over images and
    positions. For a Linear target, the mean (ReLU'd) value of each of its input features.
    Sets ``target.gate`` to that BatchNorm's name (or None)."""
    from backdoorlab.train import predict_logits

    if target.surgery is not None:
        return _graph_activations(model, target, data, batch_size)
    state: dict[str, Any] = {"out": None, "gates": set()}
    sums = {"layer": torch.zeros(target.channels, dtype=torch.float64),
            "gate": torch.zeros(target.channels, dtype=torch.float64)}

    def per_channel(t: torch.Tensor) -> torch.Tensor:
        return torch.relu(t.float()).mean(dim=(2, 3)).sum(0).double().cpu()

    def on_layer(_m, _inp, out):
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            raise BackdoorLabError(f"layer {target.name!r} outputs {type(out).__name__} "
                                   f"{tuple(getattr(out, 'shape', ()))}; expected (B, C, H, W)")
        state["out"] = out
        sums["layer"] += per_channel(out)

    def on_linear(_m, inp):
        x = inp[0].detach().float()
        sums["layer"] += torch.relu(x.reshape(-1, x.shape[-1])).sum(0).double().cpu()

    try:  # the layer of *this* model (a fine-tuned copy has its own modules; hooks on the original never fire)
        module = model.get_submodule(target.name)
    except AttributeError:
        raise BackdoorLabError(f"layer {target.name!r} does not exist in this model; prune the model the target was "
                               "found in, or a copy of it") from None
    if target.linear_inputs:
        hooks = [module.register_forward_pre_hook(on_linear)]
    else:
        hooks = [module.register_forward_hook(on_layer)]
    if isinstance(module, nn.Conv2d):
        for bn_name, bn in model.named_modules():
            if isinstance(bn, nn.BatchNorm2d) and bn.num_features == target.channels:
                def on_bn(_m, inp, out, bn_name=bn_name):
                    if state["out"] is not None and inp[0] is state["out"]:
                        state["gates"].add(bn_name)
                        sums["gate"] += per_channel(out)
                hooks.append(bn.register_forward_hook(on_bn))
    try:
        predict_logits(model, data.x, batch_size)
    finally:
        for h in hooks:
            h.remove()
    if len(state["gates"]) > 1:
        raise BackdoorLabError(f"layer {target.name!r} feeds several BatchNorm2d layers ({', '.join(sorted(state['gates']))}); "
                               "name one of them as the layer to prune")
    target.gate = next(iter(state["gates"]), None)
    n = max(1, len(data))
    return (sums["gate"] if target.gate is not None else sums["layer"]) / n


def _graph_activations(model: nn.Module, target: PruneTarget, data: ImageSet, batch_size: int) -> torch.Tensor:
    """:func:`channel_activations` of a foreign model, from a tap on its graph (the gate batch
    norm's output when one directly follows the convolution)."""
    from backdoorlab.defenses._surgery import Surgery

    s = target.surgery
    if s.model is not model:  # a copy (the iterative schedule): the same layer of its own graph
        s = Surgery(model, data.float_batch(slice(0, 2)))
    unit = next(u for u in s.units if u.name == target.name)
    run = s.tap([unit.gate_node])
    target.gate = unit.gate_weight[: -len(".weight")] if unit.gated and unit.gate_weight else None
    total = torch.zeros(target.channels, dtype=torch.float64)
    model.eval()
    for i in range(0, len(data), batch_size):
        _, (a,) = run(data.float_batch(slice(i, i + batch_size)))
        total += torch.relu(a.float()).mean(dim=(2, 3)).sum(0).double()
    return total / max(1, len(data))


def channel_masks(model: nn.Module, target: PruneTarget, channels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Boolean masks (True = zero) over the parameters of ``target`` for the pruned ``channels``."""
    params = dict(model.named_parameters())
    masks = {}
    for name in target.param_names():
        p = params[name]
        m = torch.zeros_like(p, dtype=torch.bool)
        if target.linear_inputs:
            m[:, channels.to(p.device)] = True
        else:
            m[channels.to(p.device)] = True
        masks[name] = m
    return masks


def weight_masks(model: nn.Module, target: PruneTarget, fraction: float, magnitude: bool) -> dict[str, torch.Tensor]:
    """The seed's rule: zero weights ``<= min + (max - min) * fraction`` (of ``|w|`` with ``magnitude``)."""
    name = target.param_names(weights_only=True)[0]
    w = dict(model.named_parameters())[name].detach()
    v = w.abs() if magnitude else w
    if fraction <= 0:
        return {name: torch.zeros_like(w, dtype=torch.bool)}
    lo, hi = float(v.min()), float(v.max())
    return {name: v <= lo + (hi - lo) * fraction}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the masked entries of the model's parameters, in place."""
    for name, p in model.named_parameters():
        m = masks.get(name)
        if m is not None:
            p.masked_fill_(m.to(p.device), 0.0)


def _count(masks: dict[str, torch.Tensor], name: str) -> int:
    return int(masks[name].sum()) if name in masks else 0


# ----------------------------------------------------------------------------- evaluation
class _Evaluator:
    """Held-out accuracy, and whatever the caller's ``evaluate`` callback reports (CA / ASR). With
    ``accelerate`` each evaluation runs on a traced, frozen inference copy of the model
    (:func:`inference_model`)."""

    def __init__(self, clean: ImageSet, evaluate: Evaluate | None, batch_size: int, accelerate: bool = False) -> None:
        self.clean = clean
        self.evaluate = evaluate
        self.batch_size = batch_size
        self.accelerate = accelerate
        self.probe = clean.float_batch(slice(0, 8))

    def __call__(self, model: nn.Module) -> dict[str, float]:
        from backdoorlab.train import evaluate, model_device

        fast = inference_model(model, self.probe.to(model_device(model))) if self.accelerate else model
        out = {"holdout_accuracy": evaluate(fast, self.clean, self.batch_size)}
        if self.evaluate is not None:
            out.update({k: float(v) for k, v in self.evaluate(fast).items()})
        return out


def _check_sets(model: nn.Module, clean: ImageSet) -> None:
    if not isinstance(clean, ImageSet):
        raise BackdoorLabError(f"the clean held-out set must be an ImageSet; got {type(clean).__name__}")
    if len(clean) == 0:
        raise BackdoorLabError("the clean held-out set is empty; repairs need clean images of the model's task")
    k = getattr(model, "num_classes", None)
    shape = getattr(model, "input_shape", None)
    if k is not None and clean.num_classes != k:
        raise BackdoorLabError(f"the clean held-out set has {clean.num_classes} classes but the model has {k} outputs")
    if shape is not None and tuple(clean.shape) != tuple(shape):
        raise BackdoorLabError(f"the clean held-out set has images of shape {clean.shape} but the model expects {tuple(shape)}")


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True, config=_CONFIG)
class _PruneParams:
    layer: Optional[str] = Field(None, description="module to prune: a Conv2d or BatchNorm2d (its output channels) or a "
                                 "Linear (its input neurons); default: the model's last_conv")
    criterion: Literal["activation", "weight", "weight-magnitude"] = "activation"
    step: float = Field(0.05, gt=0, le=0.5, description="fraction pruned per step")
    max_fraction: float = Field(0.95, ge=0, lt=1, description="the curve runs up to this fraction")
    fraction: Optional[float] = Field(None, ge=0, lt=1, description="prune exactly this fraction (default: by tolerance)")
    tolerance: float = Field(0.02, ge=0, le=1, description="largest clean accuracy drop accepted while pruning")
    batch_size: int = Field(256, ge=1, description="evaluation batch size")
    accelerate: bool = Field(True, description="evaluate each step on a traced, frozen inference copy (checked against eager)")


# ----------------------------------------------------------------------------- the pruning loop
class _Pruner:
    """Step fractions, rankings and masks for one model and layer."""

    def __init__(self, p: _PruneParams, model: nn.Module, clean: ImageSet) -> None:
        self.p = p
        self.target = PruneTarget(model, p.layer)
        act = channel_activations(model, self.target, clean, p.batch_size)  # also finds the gate BatchNorm
        if p.criterion != "activation":
            self.target.gate = None
        self.weight_name = self.target.param_names(weights_only=True)[0]
        self.total_weights = int(dict(model.named_parameters())[self.weight_name].numel())
        self.first_activation = act

    def fractions(self) -> list[float]:
        p = self.p
        n = int(math.floor(p.max_fraction / p.step + 1e-9))
        fr = [round(i * p.step, 10) for i in range(n + 1)]
        if p.fraction is not None and all(abs(f - p.fraction) > 1e-9 for f in fr):
            fr.append(p.fraction)
        fr = sorted(fr)
        if self.p.criterion != "activation":
            return fr
        out, seen = [], set()
        for f in fr:  # steps that prune the same number of channels are one step
            n = int(round(f * self.target.channels))
            if n not in seen:
                seen.add(n)
                out.append(f)
        return out

    def ranking(self, model: nn.Module, clean: ImageSet, pruned: torch.Tensor | None = None) -> torch.Tensor:
        """Channels, most dormant first (already ``pruned`` channels first of all)."""
        act = channel_activations(model, self.target, clean, self.p.batch_size)
        order = torch.argsort(act, stable=True)
        if pruned is None or pruned.numel() == 0:
            return order
        keep = ~torch.isin(order, pruned)
        return torch.cat([pruned, order[keep]])

    def masks(self, model: nn.Module, f: float, ranking: torch.Tensor | None,
              prev: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], int, float]:
        """(masks, pruned count, pruned fraction) at nominal fraction ``f`` for the current weights."""
        if self.p.criterion == "activation":
            assert ranking is not None
            n = int(round(f * self.target.channels))
            return channel_masks(model, self.target, ranking[:n]), n, n / self.target.channels
        m = weight_masks(model, self.target, f, self.p.criterion == "weight-magnitude")
        if prev:
            m = {k: v | prev[k] for k, v in m.items()}
        n = _count(m, self.weight_name)
        return m, n, n / self.total_weights

    def originals(self, model: nn.Module) -> dict[str, torch.Tensor]:
        names = set(self.target.param_names())
        return {n: q.detach().clone() for n, q in model.named_parameters() if n in names}


def _restore(model: nn.Module, original: dict[str, torch.Tensor]) -> nn.Module:
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, v in original.items():
            params[n].copy_(v)
    return model


def _pruning_curve(pr: _Pruner, model: nn.Module, clean: ImageSet, ev: _Evaluator,
                   tune=None) -> tuple[list[dict[str, float]], list[tuple[float, dict, dict]]]:
    """One-shot pruning of ``model`` at every step fraction (weights restored afterwards).
    Returns the curve rows (``finetuned`` = 0; plus ``tune(model, masks)`` rows with ``finetuned`` = 1
    when ``tune`` is given) and per step (fraction, masks, metrics)."""
    ranking = pr.ranking(model, clean) if pr.p.criterion == "activation" else None
    original = pr.originals(model)
    curve: list[dict[str, float]] = []
    steps: list[tuple[float, dict, dict]] = []
    for f in pr.fractions():
        masks, n, frac = pr.masks(_restore(model, original), f, ranking)
        apply_masks(model, masks)
        m = ev(model)
        row = {"fraction": float(f), "pruned_fraction": float(frac), "pruned": float(n), "finetuned": 0.0, **m}
        curve.append(row)
        steps.append((float(f), masks, m))
        log.info("pruned %.3f (%d): %s", frac, n, _fmt(m))
        if tune is not None and f > 0:
            curve.append({**row, "finetuned": 1.0, **ev(tune(model, masks))})
    _restore(model, original)
    return curve, steps


def _fmt(m: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items())


def _choose(p: _PruneParams, steps: list[tuple[float, dict, dict]], key: str = "holdout_accuracy") -> int:
    """Index of the chosen step: ``fraction`` if given, else the last step before the first one
    whose ``key`` accuracy is more than ``tolerance`` below the unpruned model's."""
    if p.fraction is not None:
        return min(range(len(steps)), key=lambda i: abs(steps[i][0] - p.fraction))
    base = steps[0][2][key]
    chosen = 0
    for i, (_f, _m, m) in enumerate(steps):
        if base - m[key] > p.tolerance + 1e-12:
            break
        chosen = i
    return chosen


COLLAPSE_POINTS = 0.10  # a repair that loses more held-out accuracy than this says so


def _summary(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The repair's figures before (``*_before``) and after; a warning when the held-out accuracy
    fell by more than ``COLLAPSE_POINTS`` (e.g. fine-tuning at a learning rate that diverged: the
    WaNet MNIST victim fell to chance at lr 0.1)."""
    a, b = before.get("holdout_accuracy"), after.get("holdout_accuracy")
    if a is not None and b is not None and a - b > COLLAPSE_POINTS:
        log.warning("the repair lost %.1f points of held-out accuracy (%.3f -> %.3f); it may have diverged: "
                    "try a lower learning rate or fewer epochs", 100 * (a - b), a, b)
    out: dict[str, Any] = {f"{k}_before": v for k, v in before.items()}
    out.update(after)
    return out


class _CurveHooks:
    """Report hooks shared by the three repairers: the CA / ASR curve figure and the summary."""

    report_keys = ("pruned_fraction", "holdout_accuracy")

    def metrics(self, result: RepairResult) -> dict[str, float]:
        d = result.details
        return {k: float(d[k]) for k in self.report_keys if isinstance(d.get(k), (int, float))}

    def figures(self, result: RepairResult, truth: torch.Tensor | None = None) -> dict[str, bytes]:
        from backdoorlab.plots_defenses import pruning_curve

        if not result.curve:
            return {}
        d = result.details
        return {"repair_curve": pruning_curve(result.curve, chosen=d.get("pruned_fraction"),
                                              title=f"{d.get('method', '')} ({d.get('layer', '-')})")}

    def summary(self, result: RepairResult) -> dict[str, Any]:
        d = result.details
        keys = ("clean_accuracy", "attack_success_rate", "holdout_accuracy", "clean_accuracy_before",
                "attack_success_rate_before", "holdout_accuracy_before", "layer")
        return {"pruned_fraction": d.get("pruned_fraction", 0.0), **{k: d.get(k) for k in keys}, "curve": result.curve}


def _details(pr: _Pruner, method: str, p: _PruneParams, row: dict, before: dict, after: dict, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"method": method, "layer": pr.target.name, "gate": pr.target.gate, "channels": pr.target.channels,
                         "criterion": p.criterion, "chosen_fraction": row["fraction"], "pruned_fraction": row["pruned_fraction"],
                         "pruned": int(row["pruned"]), "tolerance": p.tolerance}
    if p.criterion == "activation":
        d["mean_activation"] = pr.first_activation.tolist()
    d.update(extra)
    d.update(_summary(before, after))
    return d
