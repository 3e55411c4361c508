"""Build, save and load models without ever unpickling an untrusted file.

- Native models are saved as safetensors; the model spec (registry name, parameters,
  ``num_classes``, ``input_shape``) travels in the file's metadata (and in a JSON beside it when
  the runner writes a run folder), so :func:`load_model` needs nothing else.
- Foreign models load from TorchScript files (``torch.jit.load``: a zip of code and tensors, no
  pickle of arbitrary objects) and are checked against the expected number of classes.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backdoorlab.errors import BackdoorLabError
from backdoorlab.models.registry import MODELS

SPEC_KEY = "backdoorlab.model"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a registered model."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        try:
            d = json.loads(text)
            return cls(d["name"], int(d["num_classes"]), tuple(int(s) for s in d["input_shape"]), dict(d.get("params", {})))
        except (ValueError, KeyError, TypeError) as exc:
            raise BackdoorLabError(f"model spec is not valid JSON of a backdoorlab model ({exc})") from exc


def build_model(spec: ModelSpec) -> nn.Module:
    """Instantiate ``spec.name`` from :data:`MODELS` (random initial weights)."""
    model = MODELS.create(spec.name, num_classes=spec.num_classes, input_shape=spec.input_shape, **spec.params)
    model.spec = spec  # type: ignore[attr-defined]
    return model


def _atomic_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Write the weights (and the model spec as metadata) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    spec = getattr(model, "spec", None)
    if spec is None:
        raise BackdoorLabError("only models built with build_model() can be saved as safetensors; "
                               "export other models with torch.jit.script/trace")
    path = Path(path)
    tmp = _atomic_path(path)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp), metadata={SPEC_KEY: spec.to_json()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_torchscript(model: nn.Module, path: str | Path) -> Path:
    """Trace ``model`` (eval mode, float (B, C, H, W) in [0, 1] -> logits) on a zero batch of its
    ``input_shape`` and save it as TorchScript, atomically; :func:`load_model` (and any PyTorch
    program, with ``torch.jit.load``) reads it back without backdoorlab's classes."""
    import copy

    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise BackdoorLabError("only models with an input_shape (registered architectures) can be exported")
    path = Path(path)
    net = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    with torch.no_grad():
        traced = torch.jit.trace(net, torch.zeros(2, *shape))
    tmp = _atomic_path(path)
    try:
        torch.jit.save(traced, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_spec(path: str | Path) -> ModelSpec | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise BackdoorLabError(f"{path} is not a valid safetensors file ({exc}); "
                               "give weights written by backdoorlab or safetensors.torch.save_file") from exc
    return ModelSpec.from_json(meta[SPEC_KEY]) if SPEC_KEY in meta else None


class ForeignModel(nn.Module):
    """A TorchScript classifier from elsewhere; same contract (float [0,1] in, logits out)."""

    last_conv = ""

    def __init__(self, module: nn.Module, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.module = module
        self.num_classes = num_classes
        self.input_shape = input_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise BackdoorLabError("this TorchScript model exposes no features(); defenses that need "
                               "penultimate activations need a registered architecture + safetensors weights")


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
    arch_params: dict[str, Any] | None = None,
) -> nn.Module:
    """Load a model file: backdoorlab safetensors, plain safetensors + ``arch``, or TorchScript.

    ``num_classes`` / ``input_shape``, when given, are checked against the model (a TorchScript
    model is run once on a zero batch to check its output size).
    """
    path = Path(path)
    if not path.is_file():
        raise BackdoorLabError(f"model file not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] == b"PK":  # zip archive: TorchScript
        if path.suffix == ".safetensors":
            raise BackdoorLabError(f"{path} is a zip archive, not safetensors")
        if input_shape is None or num_classes is None:
            raise BackdoorLabError("a TorchScript model needs the data's input shape and number of classes to be checked")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise BackdoorLabError(f"{path} is not a loadable TorchScript file ({exc}); export with torch.jit.script or torch.jit.trace") from exc
        module.eval()
        with torch.inference_mode():
            try:
                out = module(torch.zeros(2, *input_shape))
            except Exception as exc:  # arbitrary user code inside the TorchScript model
                raise BackdoorLabError(f"the TorchScript model fails on inputs of shape (B, {', '.join(map(str, input_shape))}): {exc}") from exc
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != num_classes:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BackdoorLabError(f"the TorchScript model outputs {got} for a batch of 2, but the data has "
                                   f"{num_classes} classes: expected (2, {num_classes})")
        return ForeignModel(module, num_classes, input_shape)
    from safetensors.torch import load_file

    spec = read_spec(path)
    if spec is None:
        if arch is None or num_classes is None or input_shape is None:
            raise BackdoorLabError(f"{path} carries no backdoorlab model spec; name the architecture "
                                   f"(one of: {', '.join(MODELS.names())}) and the data")
        spec = ModelSpec(arch, num_classes, tuple(input_shape), dict(arch_params or {}))
    if num_classes is not None and spec.num_classes != num_classes:
        raise BackdoorLabError(f"the model has {spec.num_classes} outputs but the data has {num_classes} classes")
    if input_shape is not None and tuple(spec.input_shape) != tuple(input_shape):
        raise BackdoorLabError(f"the model expects images of shape {tuple(spec.input_shape)} (C,H,W) "
                               f"but the data has {tuple(input_shape)}")
    model = build_model(spec)
    try:
        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
    except (RuntimeError, OSError) as exc:
        raise BackdoorLabError(f"weights in {path} do not fit model {spec.name!r}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model
