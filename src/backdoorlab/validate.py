"""Checks at the boundary, in one place: everything a user points backdoorlab at (data files,
image folders, model files, YAML configs) is checked here before anything runs, so every entry
point (the CLI, the Python API, configs and grids) refuses bad input with the same one-line
:class:`~backdoorlab.errors.BackdoorLabError` that names the problem and the fix.

- Data: :func:`read_npz` (file kind, readable zip, no pickled arrays), :func:`images_array`
  (numeric, uint8, (N,H,W[,C]) with C in 1/3, not empty), :func:`labels_array` (integers, one per
  image, in range, at least two classes).
- Models: :func:`model_format` tells safetensors / TorchScript / ``torch.export`` apart by content
  and refuses anything else (a pickle is never unpickled); :func:`check_pt2_archive` refuses a
  ``.pt2`` that holds pickled payloads; :func:`probe_model` runs one batch through a model and
  checks its output against the data's classes.
- Configs: :func:`read_yaml_mapping` (text, valid YAML, a non-empty mapping) and
  :func:`resolve_paths` (relative data paths resolved against the YAML file's folder).
"""

from __future__ import annotations

import io
import json
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from backdoorlab.errors import BackdoorLabError

# ----------------------------------------------------------------------------- messages

NPZ_HELP = ("an npz data set needs x (uint8 images, (N,H,W) or (N,H,W,C) with C 1 or 3) and y (integer "
            "labels 0..K-1, one per image), or x_train/y_train (and x_test/y_test); write one with "
            "numpy.savez(path, x=x, y=y)")


def one_line(text: str, limit: int = 400) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def exception_summary(exc: BaseException) -> str:
    """The gist of an exception raised by foreign code (a TorchScript program's message carries
    its own traceback: keep its last line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if re.match(r"^[A-Za-z_][\w.]*(Error|Exception):", last):  # already names its type
        return one_line(last, 240)
    return one_line(f"{type(exc).__name__}: {last}" if last else type(exc).__name__, 240)


def _sniff(head: bytes) -> str:
    """What a file whose first bytes are ``head`` looks like (for error messages)."""
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "a zip archive"
    if head.startswith(b"\x93NUMPY"):
        return "a single .npy array"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "a Python pickle"
    if head.startswith(b"\x89PNG"):
        return "a PNG image"
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "a binary file of unknown kind"


def _head(path: Path, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise BackdoorLabError(f"{path} cannot be read ({exception_summary(exc)}); check its permissions") from None


def existing_file(path: str | Path, what: str, hint: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise BackdoorLabError(f"{what}: {p} is a folder, not a file; {hint}")
    if not p.is_file():
        raise BackdoorLabError(f"{what}: file not found: {p}; {hint}")
    return p


# ----------------------------------------------------------------------------- data
def read_npz(path: str | Path, what: str = "data", keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (only ``keys``, when given), checked: the file exists, is a
    zip of ``.npy`` arrays, and holds no object arrays (which would need unpickling)."""
    p = existing_file(path, what, "give the path of an .npz file with keys x and y")
    head = _head(p)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06")):
        kind = _sniff(head)
        fix = ("write the arrays with numpy.savez(path, x=x, y=y)" if kind != "a single .npy array"
               else "save images and labels together with numpy.savez(path, x=x, y=y)")
        raise BackdoorLabError(f"{what}: {p} is {kind}, not an .npz file; {fix}")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(p, allow_pickle=False) as f:
            for k in f.files:
                if keys is not None and k not in keys:
                    continue
                try:
                    arrays[k] = f[k]
                except ValueError as exc:
                    if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                        raise BackdoorLabError(f"{what}: {p}: array {k!r} holds Python objects, which backdoorlab "
                                               "never unpickles; store numbers (uint8 images, integer labels) "
                                               "or fixed-width strings") from None
                    raise
    except BackdoorLabError:
        raise
    except Exception as exc:  # zipfile / numpy raise many kinds for a corrupt archive
        raise BackdoorLabError(f"{what}: {p} is not a readable .npz file ({exception_summary(exc)}); "
                               "write it again with numpy.savez(path, x=x, y=y)") from None
    if not arrays and keys is None:
        raise BackdoorLabError(f"{what}: {p} holds no arrays; {NPZ_HELP}")
    return arrays


def images_array(x: Any, what: str) -> np.ndarray:
    """``x`` checked as images: numeric uint8, (N,H,W) or (N,H,W,C) with C 1 or 3, N >= 1.
    Returns it as (N,H,W,C)."""
    x = np.asarray(x)
    kind = x.dtype.kind
    if kind in "USO" or kind == "V":
        raise BackdoorLabError(f"{what}: images must be numbers (uint8 0..255); got {x.dtype} values")
    if kind == "b":
        raise BackdoorLabError(f"{what}: images must be uint8 (0..255); got booleans. "
                               "Convert with (x * 255).astype('uint8')")
    if kind == "c":
        raise BackdoorLabError(f"{what}: images must be uint8 (0..255); got complex numbers")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise BackdoorLabError(f"{what}: images must have shape (N,H,W) or (N,H,W,C) with C 1 or 3; got {x.shape}")
    if x.shape[-1] not in (1, 3):
        fix = ("; they look channels-first: transpose with x.transpose(0, 2, 3, 1)" if x.shape[1] in (1, 3) else "")
        raise BackdoorLabError(f"{what}: images must have shape (N,H,W) or (N,H,W,C) with C 1 (grey) or 3 (RGB); "
                               f"got {x.shape}{fix}")
    if x.shape[0] == 0:
        raise BackdoorLabError(f"{what}: the data set is empty (0 images); give at least one image per class")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise BackdoorLabError(f"{what}: images of size {x.shape[1]}x{x.shape[2]} hold no pixels; got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if kind == "f":
        if not np.isfinite(x).all():
            raise BackdoorLabError(f"{what}: images contain NaN or infinite values; give uint8 images (0..255)")
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0.0 and hi <= 1.0:
            fix = "if they are floats in [0, 1], convert with (x * 255).round().astype('uint8')"
        elif lo >= 0.0 and hi <= 255.0:
            fix = "if they are floats in [0, 255], convert with x.round().astype('uint8')"
        else:
            fix = (f"their values span {lo:.3g}..{hi:.3g}, outside [0, 1] and [0, 255] (normalised?); "
                   "undo the normalisation and give uint8 pixels 0..255")
        raise BackdoorLabError(f"{what}: images must be uint8 (0..255); got {x.dtype}; {fix}")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi > 255:
        raise BackdoorLabError(f"{what}: images must be uint8 (0..255); got {x.dtype} values {lo}..{hi}, "
                               "outside 0..255")
    raise BackdoorLabError(f"{what}: images must be uint8 (0..255); got {x.dtype} (values {lo}..{hi}); "
                           "convert with x.astype('uint8')")


def labels_array(y: Any, n: int, what: str, num_classes: int | None = None) -> np.ndarray:
    """``y`` checked as class labels of ``n`` images: integers, 1-D, one per image, >= 0 and below
    ``num_classes`` when given. Returns int64."""
    y = np.asarray(y)
    kind = y.dtype.kind
    if kind in "USO":
        sample = y.ravel()[:1].tolist()
        eg = f" (e.g. {sample[0]!r})" if sample else ""
        raise BackdoorLabError(f"{what}: labels must be integer class indices 0..K-1; got {y.dtype} values{eg}; "
                               "map class names to 0..K-1, or convert digit strings with y.astype('int64')")
    if y.ndim == 2 and y.shape[0] == n and y.shape[1] > 1:
        raise BackdoorLabError(f"{what}: labels must be class indices of shape (N,); got shape {y.shape} "
                               "(one-hot?): convert with y.argmax(1)")
    if y.ndim == 2 and y.shape[1:] == (1,):
        raise BackdoorLabError(f"{what}: labels must have shape (N,); got {y.shape}: flatten with y.ravel()")
    if y.ndim != 1:
        raise BackdoorLabError(f"{what}: labels must have shape (N,), one class index per image; got {y.shape}")
    if y.shape[0] != n:
        raise BackdoorLabError(f"{what}: need one label per image: {n} images but {y.shape[0]} labels")
    if kind == "b":
        raise BackdoorLabError(f"{what}: labels must be integer class indices; got booleans: "
                               "convert with y.astype('int64')")
    if kind == "f":
        if not np.isfinite(y).all():
            raise BackdoorLabError(f"{what}: labels contain NaN or infinite values; give integer class indices")
        if y.size and not np.array_equal(y, np.round(y)):
            raise BackdoorLabError(f"{what}: labels must be integer class indices; got fractional {y.dtype} values")
        raise BackdoorLabError(f"{what}: labels must be integers; got {y.dtype}: convert with y.astype('int64')")
    if kind not in "iu":
        raise BackdoorLabError(f"{what}: labels must be integer class indices; got {y.dtype}")
    if y.size:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0:
            raise BackdoorLabError(f"{what}: labels must be class indices >= 0; got {lo}")
        if num_classes is not None and hi >= num_classes:
            raise BackdoorLabError(f"{what}: labels must lie in 0..{num_classes - 1} ({num_classes} classes); "
                                   f"got {hi}")
    return y.astype(np.int64, copy=False)


def class_count(labels: list[np.ndarray], what: str, num_classes: int | None = None) -> int:
    """The number of classes: ``num_classes`` when given, else the largest label + 1 (at least 2)."""
    if num_classes is not None:
        k = int(num_classes)
    else:
        k = 1 + max((int(y.max()) for y in labels if y.size), default=0)
    if k < 2:
        raise BackdoorLabError(f"{what}: the labels name {k} class (all 0); a classifier needs at least 2 "
                               "classes (labels 0..K-1)")
    if num_classes is None and k > 100_000:
        raise BackdoorLabError(f"{what}: the largest label is {k - 1}: labels must be class indices 0..K-1")
    return k


# ----------------------------------------------------------------------------- models
MODEL_HELP = ("give backdoorlab safetensors weights, a torch.export program (.pt2, torch.export.save) or a "
              "TorchScript file (.pt)")


def model_format(path: str | Path) -> str:
    """``safetensors``, ``torchscript`` or ``export`` (a ``torch.export`` .pt2 archive), told by the
    file's content; anything else (a pickle, a ``torch.save`` checkpoint, ...) is refused unread."""
    p = existing_file(path, "model", MODEL_HELP)
    size = p.stat().st_size
    _head(p)  # readable?
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) == 8 and head[:2] != b"PK":
            (n,) = struct.unpack("<Q", head)
            if 2 <= n <= min(size - 8, 100_000_000):
                header = fh.read(n)
                try:
                    meta = json.loads(header.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    meta = None
                if isinstance(meta, dict):
                    return "safetensors"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise BackdoorLabError(f"model: {p} is a damaged zip archive ({exception_summary(exc)}); {MODEL_HELP}") from None
        if any(nm.endswith("/archive_format") or nm == "archive_format" for nm in names):
            return "export"
        if any("/code/" in nm or nm.startswith("code/") for nm in names) and any(nm.endswith("constants.pkl") for nm in names):
            return "torchscript"
        if any(nm.endswith("data.pkl") for nm in names):
            raise BackdoorLabError(f"model: {p} is a torch.save checkpoint (a pickle), which backdoorlab never loads: "
                                   "it could run any code. Save weights with safetensors, or export the model with "
                                   "torch.export.save (.pt2) or torch.jit.save")
        raise BackdoorLabError(f"model: {p} is a zip archive but neither TorchScript nor a torch.export program; {MODEL_HELP}")
    kind = _sniff(head)
    if p.suffix == ".safetensors" and size >= 8:
        raise BackdoorLabError(f"model: {p} is not a valid safetensors file (its header is damaged or truncated); "
                               "write it again with safetensors.torch.save_file or backdoorlab")
    if kind == "a Python pickle":
        raise BackdoorLabError(f"model: {p} is a Python pickle, which backdoorlab never loads: it could run any code. "
                               "Save weights with safetensors, or export the model with torch.export.save (.pt2)")
    raise BackdoorLabError(f"model: {p} is {kind}, not a model file; {MODEL_HELP}")


def check_pt2_archive(path: str | Path) -> None:
    """Refuse a torch.export archive whose weights, constants or sample inputs would be unpickled
    (``torch.export.load`` falls back to pickle for them); plain tensors pass."""
    import torch

    p = Path(path)
    bad = "holds pickled objects, which backdoorlab never loads; export the model again with torch.export.save"
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
            if any("/data/aotinductor/" in "/" + nm for nm in names):
                raise BackdoorLabError(f"model: {p} is an AOTInductor package, not a torch.export program; "
                                       "save the program with torch.export.save")
            for nm in names:
                full, base = "/" + nm, nm.rsplit("/", 1)[-1]
                in_weights, in_constants = "/data/weights/" in full, "/data/constants/" in full
                if (in_weights or in_constants) and base.endswith("_config.json"):
                    cfg = json.loads(z.read(nm).decode("utf-8")).get("config", {})
                    for fqn, meta in cfg.items():
                        pname = str(meta.get("path_name", ""))
                        if meta.get("use_pickle") or (in_constants and not pname.startswith("tensor_")):
                            raise BackdoorLabError(f"model: {p}: {fqn!r} {bad}")
                elif (in_weights or in_constants) and base.endswith(".pt"):
                    raise BackdoorLabError(f"model: {p} uses the legacy pt2 layout (pickled weights); {bad}")
                elif "/data/sample_inputs/" in full and base.endswith(".pt"):
                    try:
                        torch.load(io.BytesIO(z.read(nm)), weights_only=True)
                    except Exception:
                        raise BackdoorLabError(f"model: {p}: its sample inputs {bad}") from None
    except BackdoorLabError:
        raise
    except Exception as exc:
        raise BackdoorLabError(f"model: {p} is not a readable torch.export archive ({exception_summary(exc)}); "
                               "save it with torch.export.save") from None


def probe_model(module: Any, input_shape: tuple[int, ...], num_classes: int, what: str = "the model") -> None:
    """Run a zero batch of 2 images of ``input_shape`` (C,H,W) through ``module``; refuse a model
    that fails on them or whose output is not (2, ``num_classes``) logits."""
    import torch

    shape = tuple(int(s) for s in input_shape)
    with torch.inference_mode():
        try:
            out = module(torch.zeros(2, *shape))
        except Exception as exc:  # arbitrary user code inside a foreign model
            raise BackdoorLabError(
                f"{what} fails on the data's images of shape {shape} (C,H,W) ({exception_summary(exc)}); "
                "give images of the size and channels the model was trained on") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BackdoorLabError(f"{what} returns {got} for a batch of 2 images; a classifier must return logits "
                               "(batch, classes)")
    if out.shape[1] != num_classes:
        raise BackdoorLabError(class_mismatch(int(out.shape[1]), num_classes))


def class_mismatch(model_classes: int, data_classes: int) -> str:
    """The error text for a model with ``model_classes`` outputs used on data with ``data_classes``."""
    if data_classes > model_classes:
        return (f"the data's labels go up to {data_classes - 1} ({data_classes} classes) but the model has "
                f"{model_classes} outputs: labels must lie in 0..{model_classes - 1}; give data of the model's task")
    return (f"the model has {model_classes} outputs but the data's labels name only {data_classes} classes "
            f"(0..{data_classes - 1}); give data of the model's task, with labels up to {model_classes - 1}")


# ----------------------------------------------------------------------------- configs
def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML of a file: a missing, binary or unparsable file is one clear error."""
    import yaml

    p = Path(path)
    if p.is_dir():
        raise BackdoorLabError(f"{what} {p} is a folder; give a YAML file")
    if not p.is_file():
        raise BackdoorLabError(f"{what} file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise BackdoorLabError(f"{what} {p} cannot be read ({exception_summary(exc)}); check its permissions") from None
    if b"\x00" in raw[:4096]:
        kind = _sniff(raw[:16])
        kind = "a binary file" if kind == "a text file" else kind
        raise BackdoorLabError(f"{what} {p} is {kind}, not YAML text; give a .yaml file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BackdoorLabError(f"{what} {p} is {_sniff(raw[:16])}, not UTF-8 YAML text; give a .yaml file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BackdoorLabError(f"{what} {p} is not valid YAML: {one_line(str(exc), 300)}") from None
    except RecursionError:
        raise BackdoorLabError(f"{what} {p} is nested too deeply to be a {what}") from None


def read_yaml_mapping(path: str | Path, what: str, example: str) -> dict[str, Any]:
    """The YAML of ``path`` as a non-empty mapping (``example`` shows what to write)."""
    p = Path(path)
    doc = read_yaml(p, what)
    if doc is None or doc == {}:
        raise BackdoorLabError(f"{p} is an empty {what}; give at least one key, e.g. {example}")
    if not isinstance(doc, dict):
        raise BackdoorLabError(f"{what} {p}: the top level must be a mapping of keys, e.g. {example}; "
                               f"got a {type(doc).__name__}")
    bad = [k for k in doc if not isinstance(k, str)]
    if bad:
        raise BackdoorLabError(f"{what} {p}: keys must be names; got {bad[0]!r}")
    return doc


#: the keys of each config section that name files or folders (resolved against a YAML file's folder)
PATH_KEYS = {"data": ("path", "test_path", "root"), "attack": ("image",), "defense": ("reference",)}


def resolve_paths(section: Any, base: Path, kind: str = "data") -> Any:
    """A copy of a config section (a dict; ``kind`` data, attack or defense) with its relative
    file paths (:data:`PATH_KEYS`) resolved against ``base`` (the folder of the YAML file that names
    them); ``~`` is expanded. Anything else is returned as it is."""
    if not isinstance(section, dict):
        return section
    out = dict(section)
    for key in PATH_KEYS[kind]:
        v = out.get(key)
        if isinstance(v, str) and v:
            p = Path(v).expanduser()
            out[key] = str(p if p.is_absolute() else (base / p).resolve())
    return out


def resolve_config_paths(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    """An experiment config (or a grid's ``base``) with the relative paths of its ``data``,
    ``attack`` and ``defenses`` sections resolved against ``base``."""
    doc = dict(doc)
    for kind in ("data", "attack"):
        if isinstance(doc.get(kind), dict):
            doc[kind] = resolve_paths(doc[kind], base, kind)
    if isinstance(doc.get("defenses"), list):
        doc["defenses"] = [resolve_paths(d, base, "defense") for d in doc["defenses"]]
    return doc


def resolve_grid_paths(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    """A grid with the relative paths of its ``datasets``, ``attacks``, ``defenses`` and ``base``
    sections resolved against ``base``, the grid file's folder."""
    doc = dict(doc)
    for key, kind in (("datasets", "data"), ("attacks", "attack"), ("defenses", "defense")):
        if isinstance(doc.get(key), list):
            doc[key] = [resolve_paths(e, base, kind) for e in doc[key]]
    if isinstance(doc.get("base"), dict):
        doc["base"] = resolve_config_paths(doc["base"], base)
    return doc
