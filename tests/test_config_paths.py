"""Configs run from anywhere (issue 23): relative paths in a config or grid resolve against the YAML
file's folder, the mnist/cifar10/gtsrb sources find their .npz copies under $BACKDOORLAB_DATA, and
the shipped configs name no file outside the repository."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from backdoorlab.errors import BackdoorLabError
from conftest import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]


def _npz(path: Path, n: int = 20, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    np.savez(path, x=g.integers(0, 256, (n, 12, 12), dtype=np.uint8), y=np.arange(n) % 2, **extra)
    return path


def test_config_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    from backdoorlab.config import load_config

    sub = tmp_path / "configs" / "exp"
    from PIL import Image

    _npz(sub / "d.npz")
    Image.fromarray(np.full((3, 3), 255, dtype=np.uint8)).save(sub / "trig.png")
    (sub / "e.yaml").write_text("data: {name: npz, path: d.npz}\nattack: {name: badnets, shape: image, image: trig.png, size: 3}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "configs" / "exp" / "e.yaml")
    assert cfg.data.extras()["path"] == str((sub / "d.npz").resolve())
    assert cfg.attack.extras()["image"] == str((sub / "trig.png").resolve())
    # --set values are typed in the shell: they stay relative to the working directory
    cfg = load_config(sub / "e.yaml", ["data.path=mine.npz"])
    assert cfg.data.extras()["path"] == "mine.npz"


def test_grid_paths_resolve_against_the_grid_folder(tmp_path, monkeypatch):
    from backdoorlab.grid import load_grid

    _npz(tmp_path / "g" / "data" / "d.npz")
    (tmp_path / "g" / "grid.yaml").write_text(
        "name: paths\ndatasets: [{name: npz, path: data/d.npz, label: d}]\n"
        "base: {data: {holdout_fraction: 0.1}}\nattacks: [{name: badnets, size: 2}]\n")
    monkeypatch.chdir(tmp_path)
    g = load_grid(Path("g/grid.yaml"))
    assert g.cells[0].config.data.extras()["path"] == str((tmp_path / "g" / "data" / "d.npz").resolve())


def test_sources_read_the_npz_copies_under_backdoorlab_data(tmp_path, monkeypatch):
    from backdoorlab.data import load_source

    g = np.random.default_rng(0)
    mnist = tmp_path / "files" / "mnist" / "mnist.npz"
    mnist.parent.mkdir(parents=True)
    np.savez(mnist, x_train=g.integers(0, 256, (30, 28, 28), dtype=np.uint8), y_train=np.arange(30) % 10,
             x_test=g.integers(0, 256, (10, 28, 28), dtype=np.uint8), y_test=np.arange(10))
    for part, n in (("train_subset", 20), ("test", 10)):
        _c = tmp_path / "files" / "cifar10" / f"cifar10_{part}_jpeg.npz"
        _c.parent.mkdir(parents=True, exist_ok=True)
        np.savez(_c, x=g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=np.arange(n) % 10)
    monkeypatch.chdir(tmp_path)  # no ./data here
    monkeypatch.delenv("BACKDOORLAB_DATA", raising=False)
    with pytest.raises(BackdoorLabError, match=r"BACKDOORLAB_DATA"):
        load_source("mnist")
    monkeypatch.setenv("BACKDOORLAB_DATA", str(tmp_path / "files"))
    raw = load_source("mnist")
    assert len(raw.train) == 30 and len(raw.test) == 10 and raw.train.num_classes == 10
    raw = load_source("cifar10")
    assert raw.train.shape == (3, 32, 32) and len(raw.test) == 10


def test_shipped_configs_name_data_through_the_sources():
    """No shipped config or grid points at a file outside the repository (``../shared``): data is
    named through the sources (``mnist``, ``cifar10``, ...) and found through $BACKDOORLAB_DATA."""
    from backdoorlab.validate import PATH_KEYS

    def sections(doc: dict):
        yield doc.get("data")
        for e in doc.get("datasets") or []:
            yield e
        yield (doc.get("base") or {}).get("data")

    for p in sorted((ROOT / "configs").rglob("*.yaml")):
        doc = yaml.safe_load(p.read_text())
        for sec in sections(doc):
            for key in PATH_KEYS["data"]:
                v = (sec or {}).get(key)
                if isinstance(v, str):
                    target = (p.parent / v).resolve()
                    assert ROOT in target.parents, f"{p.relative_to(ROOT)}: {key}: {v} lies outside the repository"


@pytest.mark.skipif(not (SHARED_DATA / "mnist" / "mnist.npz").is_file(), reason="shared MNIST copy absent")
def test_seed000_grid_finds_its_data_from_an_empty_folder(tmp_path, monkeypatch):
    from backdoorlab.data import DATASETS
    from backdoorlab.grid import load_grid

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BACKDOORLAB_DATA", str(SHARED_DATA))
    g = load_grid(ROOT / "configs" / "grids" / "seed000_mnist.yaml")
    sec = g.cells[0].config.data
    raw = DATASETS.build(sec.name, sec.extras(), where="data")
    assert len(raw.train) == 60_000 and len(raw.test) == 10_000
