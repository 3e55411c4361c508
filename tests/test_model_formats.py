"""Model formats (issue 23): torch.export programs (.pt2) beside TorchScript and safetensors; the
format told by content; no pickle ever loaded; no deprecation warning from our own torch.jit calls;
``audit``, ``guard``, ``biasmaps`` and ``repair`` quiet on stderr for every supported format."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from backdoorlab.cli import app
from backdoorlab.errors import BackdoorLabError

FORMATS = ("m.safetensors", "m.pt", "m.pt2")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A random 3-class cnn on 12x12 grey images in the three formats, and 120 clean images."""
    from backdoorlab.models import ModelSpec, build_model, export_model

    root = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    net = build_model(ModelSpec("cnn", 3, (1, 12, 12)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own export calls let no warning through
        for name in FORMATS:
            export_model(net, root / name)
    g = np.random.default_rng(1)
    np.savez(root / "clean.npz", x=g.integers(0, 256, (120, 12, 12), dtype=np.uint8), y=np.arange(120) % 3)
    _NETS[root] = net.eval()  # the reference outputs
    return root


_NETS: dict = {}


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_round_trips_and_is_told_by_content(files, name, tmp_path):
    from backdoorlab.models import load_model
    from backdoorlab.validate import model_format

    kind = {"m.safetensors": "safetensors", "m.pt": "torchscript", "m.pt2": "export"}[name]
    renamed = tmp_path / "model.bin"  # the name says nothing: the content does
    renamed.write_bytes((files / name).read_bytes())
    assert model_format(renamed) == kind
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = load_model(renamed, num_classes=3, input_shape=(1, 12, 12))
    x = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        assert torch.allclose(m(x), _NETS[files](x), atol=1e-5)
        assert m(x[:1]).shape == (1, 3)  # any batch size (a .pt2 is exported with a dynamic batch)


def test_a_pt2_program_knows_its_input_shape(files):
    from backdoorlab import api

    m = api.load_model(files / "m.pt2")  # no data needed: the program records its example input
    assert m.num_classes == 3 and tuple(m.input_shape) == (1, 12, 12)
    with pytest.raises(BackdoorLabError, match=r"expects images of shape \(1, 12, 12\)"):
        from backdoorlab.models import load_model

        load_model(files / "m.pt2", num_classes=3, input_shape=(1, 28, 28))


def test_pickles_are_refused_unread(files, tmp_path):
    from backdoorlab.models import load_model

    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (tmp_path / "a.pt").write_bytes(pickle.dumps(Payload()))
    torch.save({"w": torch.zeros(1), "p": Payload()}, tmp_path / "b.pt")
    for f, match in (("a.pt", "Python pickle"), ("b.pt", "torch.save checkpoint")):
        with pytest.raises(BackdoorLabError, match=match):
            load_model(tmp_path / f, num_classes=3, input_shape=(1, 12, 12))
    # a .pt2 whose weights would be unpickled by torch.export.load is refused too
    src = zipfile.ZipFile(files / "m.pt2")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                next(iter(cfg["config"].values()))["use_pickle"] = True
                data = json.dumps(cfg).encode()
            out.writestr(info, data)
    (tmp_path / "c.pt2").write_bytes(buf.getvalue())
    with pytest.raises(BackdoorLabError, match="pickled objects"):
        load_model(tmp_path / "c.pt2", num_classes=3, input_shape=(1, 12, 12))
    assert not marker.exists()


@pytest.mark.parametrize("name", FORMATS)
def test_commands_print_no_warning_for_any_format(files, name, tmp_path):
    """audit, guard, biasmaps and repair (fine-tuning: it works on TorchScript and torch.export
    models too) on each format: exit 0, nothing on stderr, no Python warning raised."""
    m, clean = files / name, files / "clean.npz"
    runs = [
        ["audit", "--model", m, "--data", clean, "--images-per-class", "4", "--out", tmp_path / "audit"],
        ["guard", "--model", m, "--clean", clean, "--inputs", clean, "--samples", "2"],
        ["biasmaps", "--model", m, "--data", clean, "--samples", "2", "--pair-samples", "0", "--iterations", "1",
         "--inputs", "data", "--out", tmp_path / "bias"],
        ["repair", "--model", m, "--clean", clean, "--method", "fine-tuning", "-p", "epochs=1",
         "--out", tmp_path / ("repaired" + (".pt" if name == "m.pt" else ".pt2"))],
    ]
    for args in runs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, (args, r.output, r.exception)
        assert r.stderr == "", (args, r.stderr)
        assert not caught, (args, [f"{w.category.__name__}: {w.message}" for w in caught])
    from backdoorlab.models import load_model

    repaired = load_model(runs[-1][-1], num_classes=3, input_shape=(1, 12, 12))
    assert repaired(torch.rand(2, 1, 12, 12)).shape == (2, 3)


def test_repair_out_formats(files, tmp_path):
    r = CliRunner().invoke(app, ["repair", "--model", str(files / "m.safetensors"), "--clean", str(files / "clean.npz"),
                                 "--method", "fine-tuning", "-p", "epochs=1", "--out", str(tmp_path / "r.safetensors")])
    assert r.exit_code == 0, r.output
    from backdoorlab.models import load_model

    assert type(load_model(tmp_path / "r.safetensors")).__name__ == "SmallCNN"
    for model, out, match in (("m.pt", "x.safetensors", "cannot be written as backdoorlab safetensors"),
                              ("m.pt", "x.pt2", "torch.export cannot capture a TorchScript model"),
                              ("m.pt2", "x.onnx", "name the file .pt2")):
        r = CliRunner().invoke(app, ["repair", "--model", str(files / model), "--clean", str(files / "clean.npz"),
                                     "--method", "fine-tuning", "--out", str(tmp_path / out)])
        assert r.exit_code == 2 and match in " ".join(r.stderr.split()), r.output
        assert not (tmp_path / out).exists()


def test_the_real_process_warns_nothing_with_futurewarning_as_error(files, tmp_path):
    """``python -W error::FutureWarning``: loading TorchScript raises nothing (our own torch.jit
    calls silence the deprecation); ``guard`` on a .pt prints nothing on stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = ("from backdoorlab.models import load_model, export_model; "
            f"m = load_model({str(files / 'm.pt')!r}, num_classes=3, input_shape=(1, 12, 12)); "
            f"export_model(m, {str(tmp_path / 'again.pt')!r}); print('ok')")
    p = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], env=env, capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0 and p.stdout.strip() == "ok" and p.stderr == "", p.stderr
    p = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", "from backdoorlab.cli import main; main()",
                        "guard", "--model", str(files / "m.pt"), "--clean", str(files / "clean.npz"),
                        "--inputs", str(files / "clean.npz"), "--samples", "2", "--json"],
                       env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert json.loads(p.stdout)["num_inputs"] == 120


def test_train_robust_export_names(files, tmp_path):
    r = CliRunner().invoke(app, ["train-robust", "--data", str(files / "clean.npz"), "--export", str(tmp_path / "m.onnx")])
    assert r.exit_code == 2 and "name the file .pt2" in " ".join(r.stderr.split())
    from backdoorlab.models import ModelSpec, build_model, export_model

    net = build_model(ModelSpec("vgg-small", 10, (3, 32, 32)))
    assert export_model(net, tmp_path / "v.pt2").is_file()  # every registered architecture exports with torch.export
