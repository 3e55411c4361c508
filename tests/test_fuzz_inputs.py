"""Property-based fuzzing of every input a user points backdoorlab at (issue 23).

Malformed npz files, image folders, YAML configs and grids, model files and CLI arguments are
generated with hypothesis and fed to the commands through typer's CliRunner (in-process, fast).
Each must be refused the same way: exit code 2, exactly one ``error:`` line, no traceback, and
nothing written (no run folder or database row in the store, no report folder, no file in the
working directory). Anything that gets past the checks would start real work: the entry points of
that work (victim training, grids, every defense's fit/inspect/repair/train) are replaced by a
tripwire, so an accepted input fails at once (and the fuzz stays fast) instead of training.
A few subprocess cases check the real exit code and stderr of the installed entry point.
"""

from __future__ import annotations

import io
import os
import pickle
import sqlite3
import struct
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from backdoorlab.cli import app  # noqa: E402

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
COUNTS: Counter = Counter()  # examples run per input kind (the closing test checks the total)
KINDS: Counter = Counter()  # examples per (input kind, malformation)
MESSAGES: list[str] = []  # the error lines (BACKDOORLAB_FUZZ_SHOW=1 prints them at the end)
MARKER = "unpickled-marker"


class Accepted(Exception):
    """Raised by the tripwire: a malformed input got past every check."""


class _Tripped:
    def __getattr__(self, name):
        raise Accepted(f"accepted: reached {name}()")


# ----------------------------------------------------------------------------- the workspace
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Valid inputs to combine with malformed ones: clean.npz (28x28 grey, 10 classes, 30 images),
    a random cnn as safetensors / TorchScript / torch.export, an empty store; the working
    directory is an empty folder (checked to stay empty); the tripwire is armed."""
    from backdoorlab.models import ModelSpec, build_model, export_model

    root = tmp_path_factory.mktemp("fuzz")
    g = np.random.default_rng(0)
    np.savez(root / "clean.npz", x=g.integers(0, 256, (30, 28, 28), dtype=np.uint8), y=np.arange(30) % 10)
    torch.manual_seed(0)
    net = build_model(ModelSpec("cnn", 10, (1, 28, 28)))
    for name in ("m.safetensors", "m.pt", "m.pt2"):
        export_model(net, root / name)
    export_model(build_model(ModelSpec("cnn", 10, (3, 32, 32))), root / "rgb32.safetensors")
    export_model(build_model(ModelSpec("cnn", 5, (1, 28, 28))), root / "five.pt2")
    cwd = root / "cwd"
    cwd.mkdir()
    (root / "store").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        _arm_tripwire(mp)
        yield root


def _arm_tripwire(mp: pytest.MonkeyPatch) -> None:
    import backdoorlab.api.defend as api_defend
    import backdoorlab.api.inspection as api_inspection
    import backdoorlab.bench as bench
    import backdoorlab.experiment as experiment

    def tripped(*_a, **_k):
        raise Accepted("accepted: reached real work")

    mp.setattr(experiment, "train_victim", tripped)
    mp.setattr(bench, "run_grid", tripped)
    for mod in (api_defend, api_inspection):
        real = mod.make_defense

        def guarded(*a, _real=real, **k):
            _real(*a, **k)  # its parameter checks are part of what is fuzzed
            return _Tripped()

        mp.setattr(mod, "make_defense", guarded)


def invoke(args: list[str]):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(ws: Path, args: list, what: str, kind: str = "") -> None:
    """Exit code 2, one ``error:`` line, no traceback, nothing written."""
    before = sorted(os.listdir(ws / "cwd"))
    r = invoke(list(args))
    shown = f"{what}: {args}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}\n--- exception {r.exception!r}"
    assert not isinstance(r.exception, Accepted), "accepted without an error: " + shown
    assert r.exit_code == 2, shown
    assert "Traceback" not in r.output, shown
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert "error:" not in r.stdout, shown
    assert sorted(os.listdir(ws / "cwd")) == before == [], "a file was written: " + shown
    store = ws / "store"
    runs = store / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a run folder was written: " + shown
    db = store / "backdoorlab.db"
    if db.exists():
        con = sqlite3.connect(db)
        try:
            tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            rows = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables if t in ("runs", "cells", "metrics")}
        finally:
            con.close()
        assert not any(rows.values()), f"database rows {rows}: " + shown
    assert not (ws / MARKER).exists(), "a pickle was unpickled: " + shown
    COUNTS[what] += 1
    KINDS[f"{what}:{kind}"] += 1
    MESSAGES.append(f"{what}: {lines[0]}")


class Blob(bytes):
    """File contents, shown by size in hypothesis' reports (not byte by byte)."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes: {bytes(self[:24])!r}...>"


def blobbed(strategy):
    return strategy.map(lambda case: (Blob(case[0]), case[1]))


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ----------------------------------------------------------------------------- npz files
N = st.integers(2, 12)
GOOD_Y = st.builds(lambda n: np.arange(n) % 3, st.integers(3, 12))


NPZ_KINDS = ["no-x", "no-y", "x-dtype", "x-nan", "x-shape", "y-dtype", "y-shape", "empty-set", "negative", "one-class",
             "corrupt", "empty-file", "npy", "truncated", "text", "objects"]


@st.composite
def bad_npz(draw, kind: str):
    """(file bytes, kind): every kind is malformed for every command that reads data."""
    n = draw(st.integers(3, 12))
    g = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = g.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = np.arange(n) % 3
    if kind == "no-x":
        keys = draw(st.lists(st.sampled_from(["y", "images", "x_test", "label", "X"]), min_size=1, unique=True))
        return npz_bytes(**{k: y for k in keys}), kind
    if kind == "no-y":
        keys = draw(st.lists(st.sampled_from(["labels", "Y", "y_test", "targets"]), unique=True))
        return npz_bytes(x=x, **{k: y for k in keys}), kind
    if kind == "x-dtype":
        dt = draw(st.sampled_from(["float32", "float64", "int64", "int16", "bool", "str", "complex64"]))
        scale = draw(st.sampled_from([1.0, 1 / 255, -1.0, 1000.0]))
        xx = (x.astype(np.float64) * scale).astype(dt) if dt != "str" else x.astype(str)
        return npz_bytes(x=xx, y=y), kind
    if kind == "x-nan":
        xx = x.astype(np.float32) / 255
        xx[draw(st.integers(0, n - 1)), 3, 3] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return npz_bytes(x=xx, y=y), kind
    if kind == "x-shape":
        shape = draw(st.sampled_from([(n,), (n, 28), (n, 28, 28, 2), (n, 28, 28, 4), (n, 1, 1, 28, 28), (n, 0, 28),
                                      (n, 3, 28, 28), ()]))
        return npz_bytes(x=np.zeros(shape, dtype=np.uint8), y=y), kind
    if kind == "y-dtype":
        yy = draw(st.sampled_from([y.astype(str), y.astype(np.float32) + 0.5, y.astype(bool), np.array([f"c{i}" for i in y])]))
        return npz_bytes(x=x, y=yy), kind
    if kind == "y-shape":
        yy = draw(st.sampled_from([y[:-1], np.concatenate([y, y]), y[:, None] * np.ones((1, 3), int), np.int64(1)]))
        return npz_bytes(x=x, y=yy), kind
    if kind == "empty-set":
        return npz_bytes(x=x[:0], y=y[:0]), kind
    if kind == "negative":
        yy = y.copy()
        yy[draw(st.integers(0, n - 1))] = -draw(st.integers(1, 1000))
        return npz_bytes(x=x, y=yy), kind
    if kind == "one-class":
        return npz_bytes(x=x, y=np.zeros(n, dtype=np.int64)), kind
    if kind == "corrupt":
        return b"PK\x03\x04" + draw(st.binary(min_size=0, max_size=200)), kind
    if kind == "empty-file":
        return b"", kind
    if kind == "npy":
        buf = io.BytesIO()
        np.save(buf, x)
        return buf.getvalue(), kind
    if kind == "truncated":
        full = npz_bytes(x=x, y=y)
        return full[: draw(st.integers(0, len(full) - 30))], kind
    if kind == "objects":
        buf = io.BytesIO()
        np.savez(buf, x=x, y=np.array([{"a": 1}] * n, dtype=object))
        return buf.getvalue(), kind
    return draw(st.text(min_size=0, max_size=80)).encode(), kind


@st.composite
def model_mismatch_npz(draw, kind: str):
    """Well-formed data that does not fit the 28x28 grey 10-class model."""
    n = draw(st.integers(10, 20))
    g = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "size":
        s = draw(st.sampled_from([8, 12, 20, 32, 40]))
        return npz_bytes(x=g.integers(0, 256, (n, s, s), dtype=np.uint8), y=np.arange(n) % 10), kind
    if kind == "channels":
        return npz_bytes(x=g.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8), y=np.arange(n) % 10), kind
    y = np.arange(n) % 10
    y[0] = draw(st.integers(10, 500))
    return npz_bytes(x=g.integers(0, 256, (n, 28, 28), dtype=np.uint8), y=y), kind


def _data_commands(ws: Path, bad: Path, model: str = "m.safetensors") -> list[list]:
    m, clean, store = ws / model, ws / "clean.npz", ws / "store"
    return [
        ["audit", "--model", m, "--data", bad],
        ["guard", "--model", m, "--clean", bad, "--inputs", clean],
        ["guard", "--model", m, "--clean", clean, "--inputs", bad],
        ["repair", "--model", m, "--clean", bad],
        ["biasmaps", "--model", m, "--data", bad],
        ["audit", "--model", m, "--data", clean, "--train", bad],
        ["train-robust", "--data", bad],
        ["run", "--store", store, "--set", "data.name=npz", "--set", f"data.path={bad}"],
    ]


@pytest.mark.parametrize("kind", NPZ_KINDS)
@settings(FUZZ, max_examples=5)
@given(data=st.data(), pick=st.integers(0, 7), model=st.sampled_from(["m.safetensors", "m.pt", "m.pt2"]))
def test_fuzz_npz(ws, kind, data, pick, model):
    data, _ = data.draw(blobbed(bad_npz(kind)))
    bad = write(ws / "in" / "bad.npz", data)
    cmds = _data_commands(ws, bad, model)
    if kind in ("no-y", "one-class"):  # inputs to screen need no labels (the model's classes): every other reader does
        cmds.pop(2)
    args = cmds[pick % len(cmds)]
    assert_refused(ws, args, "npz", kind)


@pytest.mark.parametrize("kind", ["size", "channels", "labels-out-of-range"])
@settings(FUZZ, max_examples=7)
@given(data=st.data(), pick=st.integers(0, 4), model=st.sampled_from(["m.safetensors", "m.pt", "m.pt2"]))
def test_fuzz_npz_against_the_model(ws, kind, data, pick, model):
    data, _ = data.draw(blobbed(model_mismatch_npz(kind)))
    bad = write(ws / "in" / "mismatch.npz", data)
    args = _data_commands(ws, bad, model)[:5][pick]
    assert_refused(ws, args, "npz-vs-model", kind)


# ----------------------------------------------------------------------------- image folders
def _png(size: tuple[int, int], mode: str = "L", seed: int = 0) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3 if mode == "RGB" else 1), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if mode == "L" else arr, mode).save(buf, format="PNG")
    return buf.getvalue()


FOLDER_KINDS = ["empty", "no-images", "not-images", "mixed-sizes", "one-class", "truncated-image"]


@st.composite
def bad_folder(draw, kind: str):
    """(files {relative path: bytes}, kind)."""
    classes = draw(st.lists(st.sampled_from(["a", "b", "c", "cat", "dog"]), min_size=2, max_size=3, unique=True))
    if kind == "empty":
        return {}, kind
    if kind == "no-images":
        return {f"{c}/notes.txt": b"hello" for c in classes} | {"readme.md": b"x"}, kind
    if kind == "not-images":
        files = {f"{c}/{i}.png": _png((28, 28), seed=i) for c in classes for i in range(2)}
        files[f"{classes[0]}/broken.{draw(st.sampled_from(['png', 'jpg', 'jpeg', 'bmp']))}"] = draw(st.binary(max_size=64))
        return files, kind
    if kind == "truncated-image":
        files = {f"{c}/{i}.png": _png((28, 28), seed=i) for c in classes for i in range(2)}
        good = _png((28, 28), seed=9)
        files[f"{classes[-1]}/cut.png"] = good[: draw(st.integers(8, len(good) - 8))]
        return files, kind
    if kind == "mixed-sizes":
        sizes = draw(st.lists(st.sampled_from([(28, 28), (20, 20), (28, 20), (32, 32)]), min_size=2, max_size=4, unique=True))
        return {f"{classes[i % len(classes)]}/{i}.png": _png(s, seed=i) for i, s in enumerate(sizes)}, kind
    return {f"{classes[0]}/{i}.png": _png((28, 28), seed=i) for i in range(3)}, kind


@pytest.mark.parametrize("kind", FOLDER_KINDS)
@settings(FUZZ, max_examples=4)
@given(data=st.data(), pick=st.integers(0, 3))
def test_fuzz_image_folders(ws, kind, data, pick):
    import shutil

    files, _ = data.draw(bad_folder(kind))
    folder = ws / "in" / "folder"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for rel, data in files.items():
        write(folder / rel, data)
    m, clean, store = ws / "m.safetensors", ws / "clean.npz", ws / "store"
    args = [["audit", "--model", m, "--data", folder],
            ["guard", "--model", m, "--clean", clean, "--inputs", folder],
            ["train-robust", "--data", folder],
            ["run", "--store", store, "--set", "data.name=folder", "--set", f"data.path={folder}"]][pick]
    assert_refused(ws, args, "folder", kind)


# ----------------------------------------------------------------------------- YAML configs and grids
_WORD = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=10)
_NOT_INT = st.one_of(st.lists(st.integers(), min_size=1, max_size=2), st.dictionaries(_WORD, st.integers(), min_size=1, max_size=2),
                     _WORD.filter(lambda w: w not in ("yes", "no", "on", "off", "true", "false", "null")).map(lambda w: w + "!"))
_BAD_VALUES = {  # dotted key -> values that key refuses
    "seed": st.one_of(_NOT_INT, st.integers(max_value=-1)),
    "threads": st.one_of(_NOT_INT, st.integers(max_value=0)),
    "train.epochs": st.one_of(_NOT_INT, st.integers(max_value=0)),
    "train.lr": st.one_of(st.floats(max_value=0.0), st.lists(st.floats(), min_size=1, max_size=2)),
    "attack.rate": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0001), st.just(float("nan"))),
    "attack.mode": _WORD.map(lambda w: "mode-" + w),
    "attack.name": _WORD.map(lambda w: "no-such-" + w),
    "attack.target": st.one_of(st.integers(max_value=-1), st.integers(min_value=10, max_value=10**6)),
    "attack.size": st.one_of(st.integers(max_value=0), st.integers(min_value=29, max_value=1000)),
    "data.name": _WORD.map(lambda w: "no-such-" + w),
    "data.test_fraction": st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0)),
    "data.path": _WORD.map(lambda w: w + ".npz"),
    "model.name": _WORD.map(lambda w: "no-such-" + w),
    "defenses": st.one_of(st.just([{"name": "no-such-defense"}]), st.just({"name": "strip"}), st.just([{"samples": 3}])),
    "data": st.one_of(st.integers(), st.lists(st.integers(), max_size=2)),
    "train": st.one_of(st.integers(), st.text(max_size=5)),
}


def _nest(dotted: str, value):
    doc: dict = {}
    node = doc
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    if dotted == "data.path":
        doc["data"]["name"] = "npz"  # a relative path: resolved against the YAML file's folder, where it is not
    return doc


CONFIG_KINDS = ["binary", "empty", "comments", "list", "scalar", "syntax", "unknown-key", "unknown-param", "python-tag",
                "non-string-key", "empty-mapping"] + [f"bad-value:{k}" for k in sorted(_BAD_VALUES)]


@st.composite
def bad_config(draw, kind: str):
    """(YAML bytes, kind) of an experiment config that must be refused."""
    import yaml
    if kind == "binary":
        return draw(st.binary(min_size=1, max_size=200).map(lambda b: b"\x00" + b)), kind
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"   \n\n", b"---\n", b"null\n", b"~\n"])), kind
    if kind == "comments":
        return ("\n".join("# " + draw(_WORD) for _ in range(draw(st.integers(1, 3)))) + "\n").encode(), kind
    if kind == "empty-mapping":
        return b"{}\n", kind
    if kind == "list":
        return yaml.safe_dump(draw(st.lists(st.one_of(_WORD, st.integers()), min_size=1, max_size=4))).encode(), kind
    if kind == "scalar":
        return yaml.safe_dump(draw(st.one_of(_WORD, st.integers(), st.floats(allow_nan=False)))).encode(), kind
    if kind == "syntax":
        return draw(st.sampled_from([b"a: [1, 2\n", b"data: {name: mnist5k\n", b"a:\n\t- 1\n", b"key: value: other\n",
                                     b"- a\nb: c\n", b"attack: {name: badnets}}\n", b'name: "unclosed\n'])), kind
    if kind == "python-tag":
        return b"!!python/object/apply:os.mkdir [" + MARKER.encode() + b"]\n", kind
    if kind == "non-string-key":
        return draw(st.sampled_from([b"1: 2\n", b"[a]: b\n", b"null: 3\n", b"true: x\n"])), kind
    if kind == "unknown-key":
        key = draw(_WORD.filter(lambda w: w not in ("name", "seed", "device", "threads", "cache", "data", "model", "attack",
                                                    "train", "defenses")))
        return yaml.safe_dump({key: draw(st.integers())}).encode(), kind
    if kind == "unknown-param":
        section = draw(st.sampled_from(["data", "model", "attack", "train"]))
        return yaml.safe_dump({section: {"zz_" + draw(_WORD): 1}}).encode(), kind
    key = kind.split(":", 1)[1]
    return yaml.safe_dump(_nest(key, draw(_BAD_VALUES[key]))).encode(), kind


GRID_KINDS = ["binary", "empty", "list", "syntax", "python-tag", "non-string-key", "no-attacks", "empty-list", "bad-name",
              "bad-cell", "bad-entry"]


@st.composite
def bad_grid(draw, kind: str):
    import yaml

    if kind in CONFIG_KINDS:
        return draw(bad_config(kind))
    base = {"name": "fuzz", "attacks": [{"name": "badnets"}]}
    if kind == "no-attacks":
        base.pop("attacks")
    elif kind == "empty-list":
        base[draw(st.sampled_from(["datasets", "models", "attacks", "seeds"]))] = []
    elif kind == "bad-name":
        base["name"] = draw(st.sampled_from(["", "a b", "../x", "-x", "x/y"]))
    elif kind == "bad-cell":
        key = draw(st.sampled_from(["attack.rate", "attack.size", "attack.name", "data.name", "model.name"]))
        section, param = key.split(".")
        bad = draw(st.integers(max_value=0) if key == "attack.size" else _BAD_VALUES[key])  # (a size too large for
        entry = {"name": "badnets" if section == "attack" else "mnist5k" if section == "data" else "cnn",  # the images
                 param: bad}  # is found when the victim's data is loaded)
        base[{"attack": "attacks", "data": "datasets", "model": "models"}[section]] = [entry]
    else:
        base[draw(st.sampled_from(["datasets", "models", "defenses"]))] = [draw(st.sampled_from([{}, {"label": "x"}, 3, "x"]))]
    return yaml.safe_dump(base).encode(), kind


@pytest.mark.parametrize("kind", CONFIG_KINDS)
@settings(FUZZ, max_examples=3)
@given(data=st.data(), as_name=st.sampled_from(["config.yaml", "c.yml", "weird name [x].yaml"]))
def test_fuzz_configs(ws, kind, data, as_name):
    data, _ = data.draw(blobbed(bad_config(kind)))
    cfg = write(ws / "in" / "cfg" / as_name, data)
    assert_refused(ws, ["run", cfg, "--store", ws / "store"], "yaml", kind)


@pytest.mark.parametrize("kind", GRID_KINDS)
@settings(FUZZ, max_examples=3)
@given(data=st.data())
def test_fuzz_grids(ws, kind, data):
    data, _ = data.draw(blobbed(bad_grid(kind)))
    grid = write(ws / "in" / "grid" / "grid.yaml", data)
    assert_refused(ws, ["bench", grid, "--store", ws / "store"], "grid", kind)


# ----------------------------------------------------------------------------- model files
class _Payload:
    """Unpickling this creates the marker file: proof that a model file was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


MODEL_KINDS = ["random", "empty", "truncated-safetensors", "bad-header", "pickle", "torch-save", "zip-junk", "truncated-zip",
               "plain-weights", "wrong-arch", "wrong-shape", "wrong-classes", "text", "npz"]


@st.composite
def bad_model(draw, ws_root: Path, kind: str):
    marker = str(ws_root / MARKER)
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=300)), kind
    if kind == "empty":
        return b"", kind
    if kind == "truncated-safetensors":
        full = (ws_root / "m.safetensors").read_bytes()
        return full[: draw(st.integers(1, len(full) - 1))], kind
    if kind == "bad-header":
        n = draw(st.integers(2, 200))
        return struct.pack("<Q", n) + draw(st.binary(min_size=0, max_size=n + 20)), kind
    if kind == "pickle":
        return pickle.dumps(_Payload(marker), protocol=draw(st.integers(2, 5))), kind
    if kind == "torch-save":
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(2), "payload": _Payload(marker)}, buf)
        return buf.getvalue(), kind
    if kind == "zip-junk":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name in draw(st.lists(st.sampled_from(["a.txt", "model/data/0", "archive/code/x.py", "data.pkl",
                                                        "version"]), min_size=1, unique=True)):
                z.writestr(name, draw(st.binary(max_size=40)))
        return buf.getvalue(), kind
    if kind == "truncated-zip":
        full = (ws_root / draw(st.sampled_from(["m.pt", "m.pt2"]))).read_bytes()
        return full[: draw(st.integers(4, len(full) - 1))], kind
    if kind == "plain-weights":  # no backdoorlab spec and no --arch
        from safetensors.torch import save

        return save({"w": torch.zeros(3)}), kind
    if kind == "wrong-arch":  # weights of another architecture under a cnn spec
        from safetensors.torch import save

        return save({"fc.weight": torch.zeros(10, 4)}, metadata={"backdoorlab.model": '{"name": "cnn", "num_classes": 10, '
                                                                 '"input_shape": [1, 28, 28], "params": {}}'}), kind
    if kind == "wrong-shape":
        return (ws_root / "rgb32.safetensors").read_bytes(), kind
    if kind == "wrong-classes":
        return (ws_root / "five.pt2").read_bytes(), kind
    if kind == "npz":
        return npz_bytes(x=np.zeros((2, 28, 28), np.uint8), y=np.zeros(2, int)), kind
    return draw(st.text(max_size=100)).encode(), kind


@pytest.mark.parametrize("kind", MODEL_KINDS)
@settings(FUZZ, max_examples=3)
@given(data=st.data(), suffix=st.sampled_from([".safetensors", ".pt", ".pt2", ".pth", ".bin"]), pick=st.integers(0, 4))
def test_fuzz_model_files(ws, kind, data, suffix, pick):
    blob, _ = data.draw(blobbed(bad_model(ws, kind)))
    bad = write(ws / "in" / f"model{suffix}", blob)
    m, clean = ws / "m.safetensors", ws / "clean.npz"
    args = [["audit", "--model", bad, "--data", clean],
            ["guard", "--model", bad, "--clean", clean, "--inputs", clean],
            ["repair", "--model", bad, "--clean", clean],
            ["biasmaps", "--model", bad, "--data", clean],
            ["biasmaps", "--model", m, "--reference", bad, "--data", clean]][pick]
    assert_refused(ws, args, "model", kind)


# ----------------------------------------------------------------------------- CLI arguments
_JUNK = st.one_of(st.text("abcxyz_!?@[]/ ", min_size=1, max_size=12), st.sampled_from(["", "nan", "[x]", "[/x]", "1.5.2"]))


@st.composite
def bad_args(draw, ws_root: Path, choice: int):
    m, clean, store = str(ws_root / "m.safetensors"), str(ws_root / "clean.npz"), str(ws_root / "store")
    guard = ["guard", "--model", m, "--clean", clean, "--inputs", clean]
    audit = ["audit", "--model", m, "--data", clean]
    repair = ["repair", "--model", m, "--clean", clean]
    bias = ["biasmaps", "--model", m, "--data", clean]
    if choice == 0:
        return guard + ["--samples", draw(st.one_of(st.integers(max_value=1).map(str), _JUNK))]
    if choice == 1:
        return guard + ["--frr", draw(st.one_of(st.floats(min_value=1.0).map(repr), st.floats(max_value=0.0).map(repr), st.just("nan")))]
    if choice == 2:
        return guard + [draw(st.sampled_from(["--superimpose", "--threshold-rule"])), "no-such-" + draw(_WORD)]
    if choice == 3:
        return audit + ["--pi", draw(st.one_of(st.floats(min_value=1.0001, max_value=1e9).map(repr), st.floats(max_value=0.0, min_value=-1e9).map(repr)))]
    if choice == 4:
        return audit + [draw(st.sampled_from(["--statistic", "--relabel"])), "no-such-" + draw(_WORD)]
    if choice == 5:
        return audit + ["--technique", str(draw(st.integers().filter(lambda t: t not in (1, 2))))]
    if choice == 6:
        return audit + ["--images-per-class", str(draw(st.integers(max_value=0)))]
    if choice == 7:
        return repair + ["--method", draw(st.sampled_from(["no-such-method", "strip", "pairwise", "abl"]))]
    if choice == 8:
        return repair + ["--param", draw(st.one_of(_WORD, _WORD.map(lambda w: "zz_" + w + "=1"), st.just("=3")))]
    if choice == 9:
        return repair + ["--out", str(ws_root / "cwd" / ("out" + draw(st.sampled_from([".onnx", ".txt", "", ".npz", ".h5"]))))]
    if choice == 10:
        return draw(st.sampled_from([guard, audit, repair, bias])) + ["--" + draw(_WORD)]
    if choice == 11:
        cmd = draw(st.sampled_from([guard, audit, repair, bias]))
        i = draw(st.sampled_from([k for k, a in enumerate(cmd) if a.startswith("--")]))
        return cmd[:i] + cmd[i + 2:]  # a required option left out
    if choice == 12:
        return ["run", "--store", store, "--set", draw(st.one_of(_WORD, st.just("=1"), _WORD.map(lambda w: "zz_" + w + "=1"),
                                                                 st.just("attack.rate=2"), st.just("seed=-3")))]
    if choice == 13:
        return ["show", "no-such-run-" + draw(_WORD), "--store", store]
    if choice == 14:
        return [draw(st.sampled_from(["no-such-command", "audits", "Run", "repairs"]))]
    option, value = draw(st.sampled_from([("--inputs", "bogus"), ("--inputs", "[x]"), ("--eps", "bogus"), ("--eps", "-1"),
                                          ("--eps", "0"), ("--eps", "2.5"), ("--eps", "nan"), ("--iterations", "0"),
                                          ("--iterations", "-1"), ("--iterations", "x"), ("--threshold", "bogus")]))
    return bias + [option, value]


@pytest.mark.parametrize("choice", range(16))
@settings(FUZZ, max_examples=3)
@given(data=st.data())
def test_fuzz_cli_arguments(ws, choice, data):
    args = data.draw(bad_args(ws, choice))
    assert_refused(ws, args, "cli", str(choice))


def test_the_tripwire_catches_accepted_inputs(ws):
    """The control: well-formed inputs get past every check and trip the wire (so a malformed input
    that got through would be reported as accepted, not pass unnoticed)."""
    m, clean = ws / "m.pt2", ws / "clean.npz"
    for args in (["audit", "--model", m, "--data", clean], ["guard", "--model", ws / "m.pt", "--clean", clean, "--inputs", clean],
                 ["repair", "--model", ws / "m.safetensors", "--clean", clean], ["train-robust", "--data", clean, "--holdout-fraction", "0.4"]):
        r = invoke(args)
        assert isinstance(r.exception, Accepted), (args, r.output)


# ----------------------------------------------------------------------------- the real process
def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", "from backdoorlab.cli import main; main()",
                           *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("case", ["npz-without-x", "binary-yaml", "pickle-model"])
def test_subprocess_exit_code_and_one_error_line(ws, tmp_path, case):
    if case == "npz-without-x":
        write(tmp_path / "d.npz", npz_bytes(y=np.arange(4), extra=np.zeros(4)))
        args = ["audit", "--model", ws / "m.pt", "--data", "d.npz"]
    elif case == "binary-yaml":
        write(tmp_path / "c.yaml", bytes(range(256)))
        args = ["run", "c.yaml", "--store", "st"]
    else:
        write(tmp_path / "m.pt", pickle.dumps(_Payload(str(tmp_path / MARKER))))
        args = ["guard", "--model", "m.pt", "--clean", ws / "clean.npz", "--inputs", ws / "clean.npz"]
    before = sorted(os.listdir(tmp_path))
    p = _cli(*args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert sorted(os.listdir(tmp_path)) == before
    COUNTS["subprocess"] += 1


def test_fuzz_total():
    """The bar of issue 23: at least 200 generated malformed inputs, every one refused."""
    kinds = {"npz", "npz-vs-model", "folder", "yaml", "grid", "model", "cli"}
    if not kinds <= set(COUNTS):
        pytest.skip(f"run the whole file for the total (ran: {dict(COUNTS)})")
    total = sum(COUNTS[k] for k in kinds)
    print(f"fuzz: {total} malformed inputs refused: {dict(COUNTS)}")
    if os.environ.get("BACKDOORLAB_FUZZ_SHOW"):
        print("\n".join(f"{k} {v}" for k, v in sorted(KINDS.items())))
        print("\n".join(MESSAGES))
    assert total >= 200, dict(COUNTS)
