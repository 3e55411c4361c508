"""Resolve what users point commands at: data (an .npz file, an image folder, a registered data
set name) and models (safetensors weights with or without a spec, a torch.export program, a
TorchScript file). The checks themselves live in :mod:`backdoorlab.validate`. Shared by ``audit``, ``guard``, ``repair``, ``biasmaps``, ... so that
every command accepts the same inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet


def load_images(spec: str, *, split: str = "train", image_size: int | None = None) -> ImageSet:
    """An :class:`ImageSet` from ``spec``: an ``.npz`` path, an image folder, or a registered data
    set name (``mnist5k``, ``digits``; ``name:root`` for the others). ``split`` picks ``train`` or
    ``test`` where the source has both (an npz with x_train/x_test); ``auto`` takes the test split
    when there is one (a defender's clean set), else the whole file."""
    from backdoorlab.data import DATASETS, load_source

    p = Path(spec)
    if p.suffix == ".npz" or p.is_file():
        raw = load_source("npz", path=str(p))
    elif p.is_dir():
        raw = load_source("folder", path=str(p), image_size=image_size)
    else:
        name, _, root = spec.partition(":")
        if name not in DATASETS:
            raise BackdoorLabError(f"{spec!r} is neither a file, a folder nor a data set name "
                                   f"(known: {', '.join(DATASETS.names())})")
        params: dict[str, Any] = {"root": root} if root else {}
        raw = load_source(name, **params)
    if split == "auto":
        return raw.test if raw.test is not None else raw.train
    if split == "test":
        if raw.test is None:
            raise BackdoorLabError(f"{spec} has no test split (x_test/y_test); give a file with x and y")
        return raw.test
    return raw.train


def load_model_for(path: str | Path, data: ImageSet, *, arch: str | None = None,
                   arch_params: dict[str, Any] | None = None) -> nn.Module:
    """Load a model file and check it against ``data`` (classes and image shape)."""
    from backdoorlab.models import load_model

    return load_model(path, arch=arch, num_classes=data.num_classes, input_shape=data.shape, arch_params=arch_params)
