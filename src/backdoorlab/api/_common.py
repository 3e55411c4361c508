"""What every API function shares: loading models and data from paths or objects, building a
defense of a family by name, JSON-ready values, and the report base class (``to_dict`` /
``write(folder)``)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import torch
from torch import nn

from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet, PoisonedSet

ModelLike = Union[str, Path, nn.Module]
DataLike = Union[str, Path, ImageSet]

_FAMILY_WORDS = {  # family -> (a member, the members)
    "inspector": ("an inspector", "inspectors"),
    "cleanser": ("a cleanser", "cleansers"),
    "detector": ("an input detector", "input detectors"),
    "repairer": ("a repairer", "repairers"),
    "robust-trainer": ("a robust trainer", "robust trainers"),
}


# ----------------------------------------------------------------------------- loading
def load_data(spec: DataLike, *, split: str = "auto", num_classes: int | None = None) -> ImageSet:
    """An :class:`ImageSet` from an ``.npz`` path, an image folder or a registered data set name
    (``mnist5k``; ``name:root``), or the ImageSet itself. ``split``: ``auto`` (the test part when
    the source has one, else the whole file: a defender's clean set), ``train`` or ``test``.
    ``num_classes`` forces an npz's class count (e.g. triggered images that all carry one label)."""
    from backdoorlab.inputs import load_images

    if isinstance(spec, ImageSet):
        return spec
    if not isinstance(spec, (str, Path)):
        raise BackdoorLabError(f"data must be a path, a data set name or an ImageSet; got {type(spec).__name__}")
    p = Path(spec)
    if num_classes is not None and (p.suffix == ".npz" or p.is_file()):
        from backdoorlab.data import load_source

        raw = load_source("npz", path=str(p), num_classes=num_classes)
        if split == "test" and raw.test is None:
            raise BackdoorLabError(f"{spec} has no test split (x_test/y_test); give a file with x and y")
        return raw.train if split == "train" or raw.test is None else raw.test
    return load_images(str(spec), split=split)


def load_model(path: ModelLike, *, data: DataLike | None = None, arch: str | None = None) -> nn.Module:
    """A model from a backdoorlab safetensors file, plain safetensors weights (with ``arch``), a
    torch.export program (``.pt2``) or a TorchScript file (which needs ``data``: its classes and
    image shape), or the module itself; the format is told by content, and a pickle is refused
    unread. With ``data``, the model is checked against it (classes, image shape: one probe batch)."""
    if isinstance(path, nn.Module):
        return path
    if not isinstance(path, (str, Path)):
        raise BackdoorLabError(f"model must be a file path or a torch.nn.Module; got {type(path).__name__}")
    if data is not None:
        from backdoorlab.inputs import load_model_for

        return load_model_for(path, load_data(data), arch=arch)
    from backdoorlab.models import load_model as _load

    try:
        return _load(path, arch=arch)
    except BackdoorLabError as exc:
        if "needs the data" in str(exc) or "and the data" in str(exc):
            raise BackdoorLabError(f"{exc}: pass load_model({str(path)!r}, data=...) with the model's images") from None
        raise


def model_and_data(model: ModelLike, data: DataLike, *, split: str, arch: str | None) -> tuple[nn.Module, ImageSet]:
    """Load ``data`` first, then the model checked against it."""
    d = load_data(data, split=split)
    return load_model(model, data=d, arch=arch), d


def ground_truth(spec: DataLike, data: ImageSet, what: str = "data") -> torch.Tensor | None:
    """``is_poison`` (N,) bool of a training set when it carries one (a PoisonedSet, or an .npz with
    ``is_poison``): ground truth, for reporting only; never given to a defense."""
    if isinstance(spec, PoisonedSet):
        return spec.is_poison.clone()
    if isinstance(spec, ImageSet):
        return None
    p = Path(spec)
    if p.suffix != ".npz" or not p.is_file():
        return None
    from backdoorlab.validate import read_npz

    truth = read_npz(p, what, keys=("is_poison",)).get("is_poison")
    if truth is None:
        return None
    if truth.shape != (len(data),) or truth.dtype.kind not in "biu":
        raise BackdoorLabError(f"{what}: is_poison has shape {truth.shape} ({truth.dtype}); expected ({len(data)},) "
                               "booleans, one flag per image")
    return torch.from_numpy(truth.astype(bool))


def defended(data: ImageSet) -> ImageSet:
    """What a defense may see of a training set: images and labels, never ``is_poison``."""
    return data.without_ground_truth() if isinstance(data, PoisonedSet) else data


def load_inputs(spec: DataLike | torch.Tensor, num_classes: int) -> tuple[ImageSet, torch.Tensor | None]:
    """Inputs to screen: an npz whose ``y`` is optional (``is_poison``, when present, is the ground
    truth), a folder, a data set name, an ImageSet (a PoisonedSet's ``is_poison`` is the truth) or a
    uint8 tensor (N, C, H, W). Returns (ImageSet, truth or None)."""
    import numpy as np

    from backdoorlab.data import to_imageset

    if isinstance(spec, torch.Tensor):
        if spec.dim() != 4 or spec.dtype != torch.uint8:
            raise BackdoorLabError(f"inputs as a tensor must be uint8 (N, C, H, W); got {spec.dtype} {tuple(spec.shape)}")
        return ImageSet(spec, torch.zeros(spec.shape[0], dtype=torch.long), num_classes, name="inputs"), None
    if isinstance(spec, ImageSet):
        return defended(spec), ground_truth(spec, spec)
    from backdoorlab.validate import images_array, labels_array, read_npz

    if not isinstance(spec, (str, Path)):
        raise BackdoorLabError(f"inputs must be a path, a data set name, an ImageSet or a uint8 tensor; got {type(spec).__name__}")
    p = Path(spec)
    if p.suffix != ".npz":
        return load_data(spec, split="train", num_classes=num_classes), None
    arrays = read_npz(p, "inputs")
    xk = "x" if "x" in arrays else "x_train" if "x_train" in arrays else None
    if xk is None:
        raise BackdoorLabError(f"inputs: {p} has no images: expected key x (uint8 (N,H,W[,C])) and optionally y and "
                               f"is_poison; found keys {sorted(arrays)}")
    x = images_array(arrays[xk], f"inputs {p}")
    yk = "y" if xk == "x" else "y_train"
    # labels are optional (the detector never reads them); when present they must be the model's classes
    y = (labels_array(arrays[yk], x.shape[0], f"inputs {p}", num_classes) if yk in arrays
         else np.zeros(x.shape[0], dtype=np.int64))
    data = to_imageset(x, y, name=p.stem, num_classes=num_classes)
    truth = arrays.get("is_poison")
    if truth is not None:
        if truth.shape != (len(data),) or truth.dtype.kind not in "biu":
            raise BackdoorLabError(f"inputs: is_poison has shape {truth.shape} ({truth.dtype}); expected ({len(data)},) "
                                   "booleans, one flag per image")
        truth = torch.from_numpy(truth.astype(bool))
    return data, truth


def subsample(data: ImageSet, size: int | None) -> ImageSet:
    """A stratified subsample of ``size`` images (seed 0), or ``data`` when ``size`` is None."""
    if size is None:
        return data
    from backdoorlab.data import stratified_subsample

    return stratified_subsample(data, size, torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- defenses
def make_defense(method: Any, params: dict[str, Any] | None = None, *, family: str | None = None,
                 where: str | None = None, option: str = "method", defaults: dict[str, Any] | None = None):
    """The defense ``method`` (a registered name, or a Defense instance used as is) built with
    ``params``; it must belong to ``family`` when given. ``defaults`` fill parameters the method
    accepts and ``params`` does not set (e.g. the seed). Errors name keys as ``where.key``."""
    from backdoorlab.defenses import DEFENSES
    from backdoorlab.defenses.base import Defense, family_of

    params = dict(params or {})
    if isinstance(method, Defense):
        if params:
            raise BackdoorLabError(f"{option}: parameters {sorted(params)} given with a built defense; "
                                   "pass the method's name instead, or build it with them")
        fam = family_of(method)
        if family is not None and fam != family:
            raise BackdoorLabError(f"{option} {method.describe()} is not {_FAMILY_WORDS[family][0]} (it is {fam or 'no family'})")
        return method
    entry = DEFENSES.get(method)
    if family is not None and family_of(entry.factory) != family:
        names = [e.name for e in DEFENSES if family_of(e.factory) == family]
        one, many = _FAMILY_WORDS[family]
        raise BackdoorLabError(f"{option} {method!r} is not {one}; {many}: {', '.join(names)}")
    accepted = DEFENSES.parameters(method)
    for k, v in (defaults or {}).items():
        if k in accepted and k not in params:
            params[k] = v
    return DEFENSES.build(method, params, where=where or str(method))


def method_name(defense: Any, method: Any) -> str:
    """The registered name of a defense given by name or as an instance."""
    if isinstance(method, str):
        return method
    from backdoorlab.defenses import DEFENSES

    return next((e.name for e in DEFENSES if e.factory is type(defense)), type(defense).__name__)


# ----------------------------------------------------------------------------- JSON and reports
def json_ready(v: Any) -> Any:
    """``v`` with tensors / arrays as lists, tuples as lists, paths as strings and non-finite
    floats as None: what ``json.dumps`` writes as strict JSON."""
    if isinstance(v, torch.Tensor):
        v = v.item() if v.dim() == 0 else v.tolist()
    elif hasattr(v, "tolist") and type(v).__module__ == "numpy":
        v = v.tolist()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k if isinstance(k, (str, int, float, bool)) or k is None else str(k): json_ready(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_ready(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def to_json(obj: Any, indent: int | None = None) -> str:
    return json.dumps(json_ready(obj), indent=indent, sort_keys=True)


def stamped(kind: str) -> Path:
    """The default report folder ``./<kind>-<time>``."""
    return Path(f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")


def pairs(p: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(int(s), int(t)) for s, t in p]


@dataclass(eq=False)
class Report:
    """Base of the API's results: :meth:`to_dict` (JSON-ready), :meth:`figures` (stem -> PNG),
    :meth:`files` (the report folder's contents) and :meth:`write` (the folder, atomically)."""

    kind: ClassVar[str] = "report"
    report_dir: Path | None = field(default=None, init=False)

    def _dict(self) -> dict[str, Any]:  # pragma: no cover - every report defines it
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values (with ``report_dir`` once written)."""
        d = self._dict()
        if self.report_dir is not None:
            d["report_dir"] = str(self.report_dir)
        return json_ready(d)

    def figures(self) -> dict[str, bytes]:
        """PNG figures by stem name (from the method's own hook)."""
        return {}

    def data_files(self) -> dict[str, bytes]:
        """Data files of the report folder besides ``<kind>.json`` and the figures."""
        return {}

    def files(self) -> dict[str, bytes]:
        """The report folder: ``<kind>.json``, ``figures/<stem>.png`` and the data files."""
        out = {f"figures/{stem}.png": png for stem, png in self.figures().items()}
        out.update(self.data_files())
        out[f"{self.kind}.json"] = (to_json(self._dict(), indent=2) + "\n").encode()
        return out

    def default_folder(self) -> Path:
        return stamped(self.kind)

    def write(self, folder: str | Path | None = None) -> Path:
        """Write the report folder (default ``./<kind>-<time>``) all or nothing; an existing folder
        of that name is replaced. Returns the folder."""
        from backdoorlab.atomic import atomic_write_dir

        final = Path(folder) if folder is not None else self.default_folder()
        atomic_write_dir(final, self.files(), overwrite=True)
        self.report_dir = final
        return final

    def write_figures(self, folder: str | Path) -> dict[str, str]:
        """Write only the figures, as ``<folder>/<stem>.png`` (each atomically); stem -> path."""
        from backdoorlab.atomic import atomic_write_bytes

        written = {}
        for stem, png in self.figures().items():
            path = Path(folder) / f"{stem}.png"
            atomic_write_bytes(path, png)
            written[stem] = str(path)
        return written
