"""Repairs on any loaded model: our architectures, TorchScript files and ``torch.export`` programs.

A repairer needs four things from a model, and finds them from the model itself, never from its
name: the parameters to train, the convolutions and the batch norms that consume them, the
activations of chosen layers (attention maps, channel activations, the penultimate features), and
a way to silence or rescale a channel.

How (:class:`Surgery`):

- **A graph of the model** (``torch.fx``): a native ``nn.Module`` is traced symbolically (the
  graph calls the model's own submodules, so it shares their parameters and their train/eval mode);
  a ``torch.export`` program's ``.module()`` already is a graph; a TorchScript module is converted to
  one with PyTorch's TorchScript -> ``torch.export`` converter, whose graph reads the very tensors of
  the TorchScript module (a change made through either is seen by both).
- **Layers**: every 2-D convolution of the graph (``nn.Conv2d`` modules, ``aten.conv2d`` /
  ``aten.convolution`` calls) with its weight and bias, and the batch norm that directly consumes
  its output (its *gate*), if any; the last linear layer and its input (the penultimate activation).
- **Activations**: a copy of the graph whose output also returns chosen nodes (:meth:`Surgery.tap`),
  differentiable, reading the same parameters.
- **Channels**: silenced or rescaled through the parameters (a conv output channel's weight and
  bias, its gate's scale and shift), so the repaired model keeps its format and is written back as
  it came (``.pt`` / ``.pt2`` / ``.safetensors``) with no extra state; :func:`perturbed` runs the
  graph with substituted parameters (``torch.func.functional_call``) for per-channel masks.

Limits: a foreign model keeps the mode it was captured in (batch-norm statistics frozen while it
is fine-tuned); a native model that ``torch.fx`` cannot trace gets one clear error from the methods
that need layers (fine-tuning and i-BAU need none).
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from backdoorlab.errors import BackdoorLabError

log = logging.getLogger(__name__)


@dataclass
class ConvUnit:
    """One convolution and what gates its output channels. Names are tensor names of
    :attr:`Surgery.net`; ``gate_*`` name the batch norm that directly consumes the convolution's
    output (None without one). ``node`` / ``gate_node`` are the graph nodes of the convolution and
    of its gated output (the batch norm's, or the convolution's own); ``size`` (H, W) of its output."""

    name: str
    weight: str
    bias: str | None
    channels: int
    node: Any
    gate_node: Any
    gate_weight: str | None = None
    gate_bias: str | None = None
    gate_mean: str | None = None
    gate_var: str | None = None
    gate_eps: float = 1e-5
    size: tuple[int, int] = (0, 0)

    @property
    def gated(self) -> bool:
        return self.gate_weight is not None

    def channel_params(self) -> list[str]:
        """Tensor names zeroed to silence a channel (weight, bias, gate scale and shift)."""
        return [n for n in (self.weight, self.bias, self.gate_weight, self.gate_bias) if n is not None]


def _foreign_inner(model: nn.Module) -> tuple[nn.Module, str]:
    """(the module that computes, its name prefix in ``model``) for a ForeignModel; else (model, '')."""
    from backdoorlab.models.io import ForeignModel

    if isinstance(model, ForeignModel):
        return model.module, "module."
    return model, ""


def is_torchscript(model: nn.Module) -> bool:
    return isinstance(model, torch.jit.ScriptModule) or any(isinstance(m, torch.jit.ScriptModule) for m in model.modules())


def is_foreign(model: nn.Module) -> bool:
    """A TorchScript module or ``torch.export`` program (wrapped or not), not one of our architectures."""
    from backdoorlab.models.io import ForeignModel

    return (isinstance(model, (ForeignModel, torch.jit.ScriptModule, torch.fx.GraphModule))
            or any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()))


_CONTAINERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)


class _Tracer(torch.fx.Tracer):
    """``torch.fx``'s tracer, with one change: a subclass of a standard layer that keeps the layer's
    ``forward`` (e.g. a ``BatchNorm2d`` with other defaults, as fastnet's) stays a leaf like the
    layer itself. The default tracer steps into it, and batch norm's input checks stop the trace."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if super().is_leaf_module(m, module_qualified_name):
            return True
        base = next((b for b in type(m).__mro__[1:] if b.__module__.startswith("torch.nn.")), None)
        return base is not None and base not in _CONTAINERS and type(m).forward is base.forward


def _graph(inner: nn.Module, probe: torch.Tensor) -> torch.fx.GraphModule:
    if isinstance(inner, torch.jit.ScriptModule):
        from backdoorlab.models.io import quiet_export, quiet_jit

        try:
            from torch._export.converter import TS2EPConverter

            with quiet_jit(), quiet_export(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = TS2EPConverter(inner, (probe[:2],)).convert().module()
        except Exception as exc:  # noqa: BLE001 - the converter refuses some TorchScript constructs
            from backdoorlab.validate import exception_summary

            raise BackdoorLabError(f"this TorchScript model cannot be converted to a graph ({exception_summary(exc)}); "
                                   "this repair needs its layers: use fine-tuning or i-bau, or give a .pt2 "
                                   "(torch.export) file") from None
        return gm
    if isinstance(inner, torch.fx.GraphModule):
        return inner
    try:
        tracer = _Tracer()
        graph = tracer.trace(inner)
        return torch.fx.GraphModule(tracer.root, graph, type(inner).__name__)
    except Exception as exc:  # noqa: BLE001 - Python control flow the tracer cannot follow
        from backdoorlab.validate import exception_summary

        raise BackdoorLabError(f"torch.fx cannot trace this model ({exception_summary(exc)}); this repair needs its "
                               "layers: use fine-tuning or i-bau, or export the model with torch.export (.pt2)") from None


def _attr_name(node: Any) -> str | None:
    return str(node.target) if getattr(node, "op", None) == "get_attr" else None


def _target_name(node: Any) -> str:
    t = node.target
    return str(getattr(t, "__name__", t))


def _is_conv(gm: nn.Module, node: Any) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Conv2d)
    return node.op == "call_function" and _target_name(node).split(".")[0] in ("conv2d", "convolution", "_convolution")


def _is_bn(gm: nn.Module, node: Any) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.BatchNorm2d)
    return node.op == "call_function" and "batch_norm" in _target_name(node)


def _is_linear(gm: nn.Module, node: Any) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Linear)
    return node.op == "call_function" and _target_name(node).split(".")[0] in ("linear", "addmm")


class Surgery:
    """The layers of a model, found from its graph (see the module docstring).

    ``model`` is the model a repair changes (a copy of the caller's): a native ``nn.Module`` or a
    :class:`~backdoorlab.models.io.ForeignModel`. ``probe`` is a float batch of its inputs.
    """

    def __init__(self, model: nn.Module, probe: torch.Tensor) -> None:
        self.model = model
        self.inner, self.prefix = _foreign_inner(model)
        self.net = _graph(self.inner, probe)  # computes the model, with the model's own tensors
        gm = self.net
        tensors = {**dict(gm.named_buffers()), **dict(gm.named_parameters())}
        self._tensors = tensors
        shapes = self._shapes(probe[:2])
        units: list[ConvUnit] = []
        linears = []
        for node in gm.graph.nodes:
            if _is_conv(gm, node):
                units.append(self._conv_unit(node, shapes))
            elif _is_linear(gm, node):
                linears.append(node)
        by_node = {u.node: u for u in units}
        for node in gm.graph.nodes:
            if _is_bn(gm, node) and node.args and node.args[0] in by_node:
                u = by_node[node.args[0]]
                if len([n for n in node.args[0].users]) > 1:
                    continue  # the conv output also goes elsewhere: the BN is not its only gate
                self._set_gate(u, node)
        self.units = units
        self.linears = [self._linear_unit(n) for n in linears]
        self.linear = linears[-1] if linears else None
        if self.linear is not None:
            self.penultimate = self.linear.args[1] if _target_name(self.linear).startswith("addmm") else self.linear.args[0]
        else:
            self.penultimate = None

    # ------------------------------------------------------------------ discovery
    def _shapes(self, probe: torch.Tensor) -> dict[Any, tuple[int, ...]]:
        shapes: dict[Any, tuple[int, ...]] = {}
        gm = self.net

        class Rec(torch.fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if isinstance(out, torch.Tensor):
                    shapes[n] = tuple(out.shape)
                return out

        was = self.model.training
        self.model.train(False)  # (a ForeignModel keeps an exported program's mode itself)
        try:
            with torch.no_grad():
                Rec(gm).run(probe.contiguous())
        finally:
            self.model.train(was)
        return shapes

    def _conv_unit(self, node: Any, shapes: dict) -> ConvUnit:
        gm = self.net
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            w, b = f"{node.target}.weight", (f"{node.target}.bias" if mod.bias is not None else None)
        else:
            w = _attr_name(node.args[1])
            b = _attr_name(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
        if w is None or w not in self._tensors:
            raise BackdoorLabError(f"a convolution of the model ({node.name}) takes a computed weight; this repair needs "
                                   "plain convolution weights")
        shape = shapes.get(node, (0, 0, 0, 0))
        name = w[: -len(".weight")] if w.endswith(".weight") else w
        return ConvUnit(name, w, b, int(self._tensors[w].shape[0]), node, node, size=tuple(shape[-2:]))

    def _linear_unit(self, node: Any) -> tuple[str, str | None, int]:
        """(weight name, bias name, output features) of a linear node (names None-safe)."""
        gm = self.net
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            return f"{node.target}.weight", (f"{node.target}.bias" if mod.bias is not None else None), int(mod.out_features)
        if _target_name(node).startswith("addmm"):  # addmm(bias, x, weight.t())
            w = node.args[2].args[0] if getattr(node.args[2], "op", None) == "call_function" else node.args[2]
            wn, bn = _attr_name(w), _attr_name(node.args[0])
        else:
            wn = _attr_name(node.args[1])
            bn = _attr_name(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else None
        n = int(self._tensors[wn].shape[0]) if wn in self._tensors else 0
        return wn or "", bn, n

    def following_bn(self, unit: ConvUnit, depth: int = 6) -> tuple[str, str] | None:
        """(scale, running-variance) names of the nearest batch norm downstream of ``unit``'s output
        through channel-wise operations (ReLU, pooling, a residual sum, dropout), over the same
        channels; None when there is none (e.g. the last convolution of a pre-activation ResNet)."""
        if unit.gated:
            return unit.gate_weight, unit.gate_var  # type: ignore[return-value]
        gm = self.net
        frontier, seen = [unit.node], set()
        for _ in range(depth):
            nxt = []
            for n in frontier:
                for u in n.users:
                    if u in seen:
                        continue
                    seen.add(u)
                    if _is_bn(gm, u):
                        tmp = ConvUnit("", "", None, 0, None, None)
                        self._set_gate(tmp, u)
                        if tmp.gated and int(self._tensors[tmp.gate_weight].numel()) == unit.channels:
                            return tmp.gate_weight, tmp.gate_var  # type: ignore[return-value]
                    elif not (_is_conv(gm, u) or _is_linear(gm, u)) and u.op in ("call_function", "call_module", "call_method"):
                        nxt.append(u)
            frontier = nxt
        return None

    def _set_gate(self, u: ConvUnit, bn: Any) -> None:
        gm = self.net
        if bn.op == "call_module":
            mod = gm.get_submodule(bn.target)
            if not mod.affine or mod.running_mean is None:
                return
            names = [f"{bn.target}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
            eps = float(mod.eps)
            out = bn
        else:
            names = [_attr_name(a) for a in bn.args[1:5]]
            if any(n is None for n in names):
                return
            eps = float(next((a for a in reversed(bn.args) if isinstance(a, float)), 1e-5))
            users = list(bn.users)  # tuple-returning variants: the output is item 0
            getitems = [n for n in users if _target_name(n) == "getitem" and n.args[1] == 0]
            out = getitems[0] if getitems else bn
        u.gate_weight, u.gate_bias, u.gate_mean, u.gate_var = names
        u.gate_eps = eps
        u.gate_node = out

    def require_convs(self, what: str) -> list[ConvUnit]:
        if not self.units:
            raise BackdoorLabError(f"{what} needs convolutional layers; this model has none (use fine-tuning or i-bau)")
        return self.units

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def full_name(self, name: str) -> str:
        """The name of a tensor of :attr:`net` in the repaired model (``model.named_parameters()``)."""
        return self.prefix + name

    # ------------------------------------------------------------------ activations
    def tap(self, nodes: list[Any]) -> Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]:
        """``f(x) -> (logits, [value of each node])``, differentiable, on the model's own tensors."""
        gm = self.net
        graph = copy.deepcopy(gm.graph)
        mapping = {a.name: b for a, b in zip(gm.graph.nodes, graph.nodes)}
        out = next(n for n in graph.nodes if n.op == "output")
        orig = out.args[0]
        while isinstance(orig, (tuple, list)) and len(orig) == 1:
            orig = orig[0]
        graph.erase_node(out)
        graph.output((orig, *[mapping[n.name] for n in nodes]))
        graph._codegen = torch.fx.graph.CodeGen()  # plain positional in / tuple out (no pytree specs)
        tapped = torch.fx.GraphModule(gm, graph)

        def run(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
            res = tapped(x)
            return res[0], list(res[1:])

        return run

    # ------------------------------------------------------------------ channels
    @torch.no_grad()
    def silence(self, unit: ConvUnit, channels: torch.Tensor, keep_bias: bool = False) -> None:
        """Zero output ``channels`` of ``unit`` in place (weight, bias, gate scale and shift; with
        ``keep_bias`` only the weight, or the gate's scale)."""
        names = [unit.gate_weight if unit.gated else unit.weight] if keep_bias else unit.channel_params()
        for n in names:
            self._tensors[n][channels.to(self._tensors[n].device)] = 0.0

    def channel_masks(self, unit: ConvUnit, channels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Boolean masks (True = zero) over the model's parameters (full names) silencing ``channels``."""
        out = {}
        for n in unit.channel_params():
            m = torch.zeros_like(self._tensors[n], dtype=torch.bool)
            m[channels.to(m.device)] = True
            out[self.full_name(n)] = m
        return out


def perturbed(net: nn.Module, overrides: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``net(x)`` with some of its tensors replaced (``torch.func.functional_call``)."""
    return torch.func.functional_call(net, overrides, (x,), strict=False)


def trainable(model: nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``model`` an optimiser should take, as leaf tensors requiring grad (one clear
    error if it could not take them). A model that freezes some of its parameters by design (fastnet's
    whitening filters and batch-norm scales) keeps them frozen; a model with every parameter frozen
    (loaded for inference) has all of them made trainable."""
    params = list(model.parameters())
    if not params:
        raise BackdoorLabError("the model has no parameters to train")
    bad = [p for p in params if not p.is_leaf]
    if bad:
        raise BackdoorLabError("the model's parameters are computed tensors (not leaves), so they cannot be trained; "
                               "load the model from its file again (backdoorlab.api.load_model)")
    chosen = [p for p in params if p.requires_grad] or params
    for p in chosen:
        p.requires_grad_(True)
    return chosen


def model_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` whose parameters an optimiser takes (TorchScript included)."""
    new = copy.deepcopy(model).eval()
    trainable(new)
    return new


def tune(model: nn.Module, clean: Any, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, epochs: int,
         lr: float, batch_size: int, momentum: float = 0.9, weight_decay: float = 5e-4, seed: int = 0,
         params: list[torch.Tensor] | None = None, augment: Any = None, clip: float = 5.0) -> list[float]:
    """SGD with a cosine schedule (0.3-epoch warm-up) on ``clean`` (an ImageSet) minimising
    ``loss(x, y)`` (which runs the model itself, so it may read its activations), the gradient norm
    clipped at ``clip``; the model is in train mode meanwhile. Returns the mean loss of each epoch."""
    from backdoorlab.data.loader import Augment, TensorLoader

    import math

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loader = TensorLoader(clean.x, clean.y, batch_size, shuffle=True, generator=g, augment=augment or Augment())
    params = trainable(model) if params is None else params
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    total, step, history = max(1, epochs * len(loader)), 0, []
    warm = 0.3 * len(loader)  # linear warm-up over 0.3 epochs, as backdoorlab.train's default
    model.train()
    try:
        for _ in range(epochs):
            s, n = 0.0, 0
            for xb, yb in loader:
                for gr in opt.param_groups:
                    gr["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total)) * min(1.0, (step + 1) / warm)
                value = loss(xb.contiguous(), yb)
                if not torch.isfinite(value):
                    raise BackdoorLabError(f"the repair diverged (loss {float(value.detach())}); lower its lr")
                opt.zero_grad(set_to_none=True)
                value.backward()
                torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
                s += float(value.detach()) * len(yb)
                n += len(yb)
                step += 1
            history.append(s / max(1, n))
    finally:
        model.eval()
    return history
