"""Build, save and load models without ever unpickling an untrusted file.

- Native models are saved as safetensors; the model spec (registry name, parameters,
  ``num_classes``, ``input_shape``) travels in the file's metadata (and in a JSON beside it when
  the runner writes a run folder), so :func:`load_model` needs nothing else.
- Foreign models load from ``torch.export`` programs (``.pt2``, :func:`torch.export.load`; archives
  holding pickled payloads are refused) and from TorchScript files (``torch.jit.load``: a zip of
  code and tensors, no pickle of arbitrary objects; TorchScript is deprecated upstream but still
  read), and are checked against the data (a probe batch: image shape in, classes out).
- The format is told by the file's content (:func:`backdoorlab.validate.model_format`), never by
  its name; anything else (a pickle, a ``torch.save`` checkpoint) is refused unread.
- :func:`export_model` writes ``.pt2`` (``torch.export``, the default), ``.pt`` (TorchScript) or
  ``.safetensors`` by the file name. PyTorch's TorchScript deprecation warnings are silenced around
  our own ``torch.jit`` calls only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backdoorlab.errors import BackdoorLabError
from backdoorlab.models.registry import MODELS

SPEC_KEY = "backdoorlab.model"

#: file name endings of each export format (:func:`export_model`)
EXPORT_SUFFIXES = {".pt2": "export", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript",
                   ".safetensors": "safetensors"}


@contextlib.contextmanager
def quiet_jit():
    """Silence PyTorch's TorchScript deprecation warnings around our own ``torch.jit`` calls (the
    user gets no warning for a format we still read on purpose)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*(jit|TorchScript).*")
        yield


@contextlib.contextmanager
def quiet_export():
    """Silence torch.export's warnings and log records (it logs load failures with a traceback on
    stderr) around our own calls: the user gets one error line, raised by us."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch._dynamo", "torch.fx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


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
            shape = tuple(int(s) for s in d["input_shape"])
            if len(shape) != 3 or min(shape) < 1 or int(d["num_classes"]) < 2:
                raise ValueError(f"input_shape {shape} / num_classes {d['num_classes']} out of range")
            return cls(str(d["name"]), int(d["num_classes"]), shape, dict(d.get("params", {})))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BackdoorLabError(f"model spec is not valid JSON of a backdoorlab model ({exc})") from exc


def build_model(spec: ModelSpec) -> nn.Module:
    """Instantiate ``spec.name`` from :data:`MODELS` (random initial weights)."""
    model = MODELS.create(spec.name, num_classes=spec.num_classes, input_shape=spec.input_shape, **spec.params)
    model.spec = spec  # type: ignore[attr-defined]
    return model


def _atomic_path(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)  # torch.export wants .pt2
    os.close(fd)
    return Path(tmp)


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Write the weights (and the model spec as metadata) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    spec = getattr(model, "spec", None)
    if spec is None:
        raise BackdoorLabError("only models built with build_model() (a registered architecture) can be saved as "
                               "safetensors; write other models as a torch.export program (.pt2) or TorchScript (.pt)")
    path = Path(path)
    tmp = _atomic_path(path)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp), metadata={SPEC_KEY: spec.to_json()})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _export_input(model: nn.Module) -> tuple[nn.Module, tuple[int, int, int]]:
    """An eval-mode CPU copy of ``model`` and its input shape (C, H, W)."""
    import copy

    shape = getattr(model, "input_shape", None)
    if shape is None:
        raise BackdoorLabError("only models with an input_shape (registered architectures, or models loaded by "
                               "backdoorlab) can be exported")
    net = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format).eval()
    return net, tuple(int(s) for s in shape)


def export_torchscript(model: nn.Module, path: str | Path) -> Path:
    """Trace ``model`` (eval mode, float (B, C, H, W) in [0, 1] -> logits) on a zero batch of its
    ``input_shape`` and save it as TorchScript, atomically; :func:`load_model` (and any PyTorch
    program, with ``torch.jit.load``) reads it back without backdoorlab's classes. TorchScript is
    deprecated upstream: prefer :func:`export_program` (``.pt2``)."""
    net, shape = _export_input(model)
    path = Path(path)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the deprecation, and tracer notes the user cannot act on
            traced = torch.jit.trace(net, torch.zeros(2, *shape))
    except BackdoorLabError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever tracing trips on
        from backdoorlab.validate import exception_summary

        raise BackdoorLabError(f"this model cannot be traced to TorchScript ({exception_summary(exc)}); "
                               "write a .pt2 (torch.export) or .safetensors file instead") from None
    tmp = _atomic_path(path)
    try:
        with quiet_jit():
            torch.jit.save(traced, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_program(model: nn.Module, path: str | Path) -> Path:
    """Capture ``model`` (eval mode, float (B, C, H, W) in [0, 1] -> logits; any batch size) with
    ``torch.export`` and save the program (``.pt2``), atomically; :func:`load_model` (and any
    PyTorch program, with ``torch.export.load``) reads it back without backdoorlab's classes."""
    net, shape = _export_input(model)
    if isinstance(net, ForeignModel) and net.format == "torchscript":
        raise BackdoorLabError("a TorchScript model cannot be captured by torch.export; write it as TorchScript "
                               "again (a .pt name)")
    path = Path(path)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    try:
        with quiet_export():
            program = torch.export.export(net, (torch.zeros(2, *shape),), dynamic_shapes=({0: batch},))
    except Exception as exc:  # noqa: BLE001 - torch.export refuses some Python constructs
        from backdoorlab.validate import exception_summary

        raise BackdoorLabError(f"torch.export cannot capture this model ({exception_summary(exc)}); write it as "
                               "TorchScript (a .pt name) or safetensors weights instead") from None
    tmp = _atomic_path(path)
    try:
        with quiet_export():
            torch.export.save(program, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def export_model(model: nn.Module, path: str | Path) -> Path:
    """Write ``model`` in the format its file name asks for: ``.pt2`` a ``torch.export`` program
    (the default), ``.pt``/``.pth``/``.ts`` TorchScript, ``.safetensors`` backdoorlab weights."""
    path = Path(path)
    kind = EXPORT_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise BackdoorLabError(f"{path}: name the file .pt2 (torch.export program, the default), .pt (TorchScript) "
                               "or .safetensors (backdoorlab weights)")
    if kind == "export":
        return export_program(model, path)
    if kind == "torchscript":
        return export_torchscript(model, path)
    return save_model(model, path)


def read_spec(path: str | Path) -> ModelSpec | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        from backdoorlab.validate import exception_summary

        raise BackdoorLabError(f"{path} is not a valid safetensors file ({exception_summary(exc)}); "
                               "give weights written by backdoorlab or safetensors.torch.save_file") from None
    return ModelSpec.from_json(meta[SPEC_KEY]) if SPEC_KEY in meta else None


class ForeignModel(nn.Module):
    """A classifier from elsewhere (a ``torch.export`` program or TorchScript); same contract
    (float [0,1] in, logits out). ``format`` is ``export`` or ``torchscript``."""

    last_conv = ""

    def __init__(self, module: nn.Module, num_classes: int, input_shape: tuple[int, int, int],
                 format: str = "torchscript") -> None:
        super().__init__()
        self.module = module
        self.num_classes = num_classes
        self.input_shape = input_shape
        self.format = format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def train(self, mode: bool = True) -> "ForeignModel":
        # an exported program keeps the mode it was captured in (eval: batch-norm statistics frozen,
        # no dropout); torch refuses train() on it, but its parameters still train
        self.training = mode
        if self.format != "export":
            self.module.train(mode)
        return self

    def __deepcopy__(self, memo: dict) -> "ForeignModel":
        import copy

        if isinstance(self.module, torch.jit.ScriptModule):
            # deepcopy of a ScriptModule gives non-leaf parameters (an optimiser refuses them):
            # copy it through its own serialisation instead
            params = list(self.module.parameters())
            buf = io.BytesIO()
            with quiet_jit():
                torch.jit.save(self.module, buf)
                buf.seek(0)
                inner = torch.jit.load(buf, map_location=params[0].device if params else "cpu")
            for src, dst in zip(params, inner.parameters()):
                dst.requires_grad_(src.requires_grad)
            inner.train(self.module.training)
        else:
            inner = copy.deepcopy(self.module, memo)
        new = ForeignModel(inner, self.num_classes, self.input_shape, self.format)
        new.training = self.training
        memo[id(self)] = new
        return new

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise BackdoorLabError(f"this {'TorchScript' if self.format == 'torchscript' else 'torch.export'} model exposes "
                               "no features(); defenses that need penultimate activations need a registered "
                               "architecture + safetensors weights")


def _load_torchscript(path: Path) -> nn.Module:
    try:
        with quiet_jit():
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - a damaged archive raises anything
        from backdoorlab.validate import exception_summary

        raise BackdoorLabError(f"model: {path} is not a loadable TorchScript file ({exception_summary(exc)}); "
                               "export the model again (torch.export.save, or torch.jit.save)") from None
    return module


def _load_program(path: Path) -> tuple[nn.Module, tuple[int, ...] | None]:
    """The module of a torch.export program and the (C, H, W) of its example input (when known)."""
    from backdoorlab.validate import check_pt2_archive, exception_summary

    check_pt2_archive(path)
    try:
        with quiet_export():
            program = torch.export.load(io.BytesIO(path.read_bytes()))  # a buffer: any file name will do
            module = program.module()
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign archive raises anything
        raise BackdoorLabError(f"model: {path} is not a loadable torch.export program ({exception_summary(exc)}); "
                               "save it with torch.export.save") from None
    shape = None
    try:
        args = (program.example_inputs or ((), {}))[0]
        if len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            shape = tuple(int(s) for s in args[0].shape[1:])
    except Exception:  # noqa: BLE001 - the example inputs only improve the error message
        shape = None
    return module, shape


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] | None = None,
    arch_params: dict[str, Any] | None = None,
) -> nn.Module:
    """Load a model file: backdoorlab safetensors, plain safetensors + ``arch``, a ``torch.export``
    program (``.pt2``) or TorchScript, told apart by content (anything else is refused unread).

    ``num_classes`` / ``input_shape``, when given, are checked against the model (a foreign model
    is run once on a zero batch: images of ``input_shape`` in, ``num_classes`` logits out). A
    TorchScript model needs both; a ``torch.export`` program knows its input shape.
    """
    from backdoorlab.validate import class_mismatch, model_format, probe_model

    path = Path(path)
    fmt = model_format(path)
    if fmt in ("torchscript", "export"):
        name = "TorchScript" if fmt == "torchscript" else "torch.export"
        if fmt == "export":
            module, known_shape = _load_program(path)
            if input_shape is not None and known_shape is not None and tuple(input_shape) != known_shape:
                raise BackdoorLabError(f"the {name} model expects images of shape {known_shape} (C,H,W) but the data "
                                       f"has {tuple(input_shape)}; give images of the size and channels it was "
                                       "trained on")
            input_shape = tuple(input_shape) if input_shape is not None else known_shape
        else:
            if input_shape is None or num_classes is None:
                raise BackdoorLabError("a TorchScript model needs the data's input shape and number of classes to be checked")
            module = _load_torchscript(path)
        if input_shape is None:
            raise BackdoorLabError(f"the {name} model in {path} does not record its input shape; it needs the data "
                                   "to be checked")
        if fmt == "torchscript":
            module.eval()
        if num_classes is None:  # a program on its own: its classes are what it outputs
            with torch.inference_mode():
                try:
                    num_classes = int(module(torch.zeros(2, *input_shape)).shape[-1])
                except Exception:  # noqa: BLE001 - probe_model below names the failure
                    num_classes = -1
        probe_model(module, input_shape, num_classes, what=f"the {name} model")
        return ForeignModel(module, num_classes, tuple(input_shape), fmt)
    from safetensors.torch import load_file

    spec = read_spec(path)
    if spec is None:
        if arch is None or num_classes is None or input_shape is None:
            raise BackdoorLabError(f"{path} carries no backdoorlab model spec; name the architecture "
                                   f"(one of: {', '.join(MODELS.names())}) and the data")
        spec = ModelSpec(arch, num_classes, tuple(input_shape), dict(arch_params or {}))
    if num_classes is not None and spec.num_classes != num_classes:
        raise BackdoorLabError(class_mismatch(spec.num_classes, num_classes))
    if input_shape is not None and tuple(spec.input_shape) != tuple(input_shape):
        raise BackdoorLabError(f"the model expects images of shape {tuple(spec.input_shape)} (C,H,W) "
                               f"but the data has {tuple(input_shape)}; give images of the size and channels it "
                               "was trained on")
    try:
        model = build_model(spec)
    except BackdoorLabError as exc:
        raise BackdoorLabError(f"{path}: its model spec cannot be built ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a spec from a file may name impossible sizes
        from backdoorlab.validate import exception_summary

        raise BackdoorLabError(f"{path}: its model spec {spec.to_json()} cannot be built ({exception_summary(exc)}); "
                               "write the weights again with backdoorlab") from None
    try:
        state = load_file(str(path))
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged data
        from backdoorlab.validate import exception_summary

        raise BackdoorLabError(f"weights in {path} do not fit model {spec.name!r}: {exception_summary(exc)}; "
                               "give the architecture they were trained with (--arch)") from None
    model.eval()
    return model
