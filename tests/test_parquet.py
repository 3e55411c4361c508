"""The ``parquet`` data source, the decoded-image cache, ``cifar10`` on parquet files and the
``backdoorlab data`` verb, on tiny parquet files in the Hugging Face layout built here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from backdoorlab.cli import app  # noqa: E402
from backdoorlab.data import load_source  # noqa: E402
from backdoorlab.data import parquet as P  # noqa: E402
from backdoorlab.errors import BackdoorLabError  # noqa: E402

CLASSES = ["cat", "dog", "ship", "frog"]
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")  # torchvision 0.29


def _images(n: int, seed: int, channels: int = 3, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth images (JPEG keeps them within a few grey levels) with class-dependent colours."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % len(CLASSES)
    base = torch.rand(n, channels, 4, 4, generator=g) * 0.6 + 0.2 * (y.float() / 3)[:, None, None, None]
    x = torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def _write(path, x: torch.Tensor, y: torch.Tensor, *, image_col="img", label_col="label", metadata=True, fmt="jpeg"):
    from torchvision.io import encode_jpeg, encode_png

    enc = encode_jpeg(list(x), quality=95) if fmt == "jpeg" else [encode_png(im) for im in x]
    cols = {image_col: pa.array([{"bytes": e.numpy().tobytes(), "path": f"{i}.jpg"} for i, e in enumerate(enc)],
                                type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))}
    if label_col:
        cols[label_col] = pa.array(y.numpy().astype(np.int64))
    table = pa.table(cols)
    if metadata:
        feats = {image_col: {"_type": "Image"}}
        if label_col:
            feats[label_col] = {"names": CLASSES, "_type": "ClassLabel"}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": feats}})})
    pq.write_table(table, path)
    return path


@pytest.fixture
def shards(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    x1, y1 = _images(24, 0)
    x2, y2 = _images(16, 1)
    xt, yt = _images(12, 2)
    _write(d / "train-00000-of-00002.parquet", x1, y1)
    _write(d / "train-00001-of-00002.parquet", x2, y2)
    _write(d / "test-00000-of-00001.parquet", xt, yt)
    return d, torch.cat([x1, x2]), torch.cat([y1, y2]), xt, yt


def test_folder_of_shards_decodes_images_labels_and_class_names(shards, tmp_path):
    d, x, y, xt, yt = shards
    raw = load_source("parquet", path=str(d), cache=str(tmp_path / "cache"))
    assert raw.train.x.shape == (40, 3, 16, 16) and raw.test.x.shape == (12, 3, 16, 16)
    assert raw.train.class_names == tuple(CLASSES) and raw.train.num_classes == 4
    assert torch.equal(raw.train.y, y) and torch.equal(raw.test.y, yt)  # shards in order
    err = (raw.train.x.float() - x.float()).abs().mean()
    assert err < 8.0  # JPEG q95 (4:2:0 chroma) of these images: 3.4 grey levels; wrong order/channels/axes: >= 24
    assert (raw.test.x.float() - xt.float()).abs().mean() < 8.0


def test_cache_is_keyed_by_content_and_reused(shards, tmp_path, monkeypatch):
    d, *_ = shards
    cache = tmp_path / "cache"
    first = load_source("parquet", path=str(d), cache=str(cache))
    entries = sorted((cache / "parquet").iterdir())
    assert len(entries) == 3 and all((e / "x.npy").is_file() for e in entries)
    assert not [p for p in (cache / "parquet").iterdir() if p.name.startswith(".")]  # no temporary left

    def boom(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(P, "decode_images", boom)
    again = load_source("parquet", path=str(d), cache=str(cache))
    assert torch.equal(again.train.x, first.train.x) and torch.equal(again.test.y, first.test.y)
    assert again.train.class_names == tuple(CLASSES)
    monkeypatch.undo()
    # same file name, new content: a new cache entry, new pixels
    x3, y3 = _images(12, 7)
    _write(d / "test-00000-of-00001.parquet", x3, y3)
    third = load_source("parquet", path=str(d), cache=str(cache))
    assert len(list((cache / "parquet").iterdir())) == 4
    assert (third.test.x.float() - x3.float()).abs().mean() < 8.0
    # cache off: nothing written, not even to the default folder
    monkeypatch.setenv("BACKDOORLAB_CACHE", str(tmp_path / "off"))
    load_source("parquet", path=str(d), cache=False)
    assert not (tmp_path / "off").exists()


def test_cache_from_environment(shards, tmp_path, monkeypatch):
    d, *_ = shards
    monkeypatch.setenv("BACKDOORLAB_CACHE", str(tmp_path / "envcache"))
    load_source("parquet", path=str(d / "test-00000-of-00001.parquet"))
    assert len(list((tmp_path / "envcache" / "parquet").iterdir())) == 1


def test_single_file_png_grey_and_named_columns(tmp_path):
    x, y = _images(20, 3, channels=1)
    f = _write(tmp_path / "grey.parquet", x, y, image_col="image", label_col="fine", metadata=False, fmt="png")
    raw = load_source("parquet", path=str(f), image_column="image", label_column="fine", cache=False)
    assert raw.test is None and raw.train.x.shape == (20, 1, 16, 16)
    assert torch.equal(raw.train.x, x)  # PNG is lossless
    assert raw.train.class_names == ("0", "1", "2", "3")
    rgb = load_source("parquet", path=str(f), image_column="image", label_column="fine", mode="rgb", cache=False)
    assert rgb.train.x.shape[1] == 3


def test_bad_input_gives_one_clear_error(tmp_path):
    x, y = _images(8, 4)
    with pytest.raises(BackdoorLabError, match="no such file or folder"):
        load_source("parquet", path=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackdoorLabError, match="no train-"):
        load_source("parquet", path=str(tmp_path / "empty"))
    (tmp_path / "fake.parquet").write_text("not a parquet file at all\n" * 10)
    with pytest.raises(BackdoorLabError, match="not a readable parquet file"):
        load_source("parquet", path=str(tmp_path / "fake.parquet"), cache=False)
    nolabel = _write(tmp_path / "nolabel.parquet", x, y, label_col=None, metadata=False)
    with pytest.raises(BackdoorLabError, match="no label column"):
        load_source("parquet", path=str(nolabel), cache=False)
    ok = _write(tmp_path / "ok.parquet", x, y)
    with pytest.raises(BackdoorLabError, match="no column 'pixels'"):
        load_source("parquet", path=str(ok), image_column="pixels", cache=False)
    with pytest.raises(BackdoorLabError, match="not an image column"):
        load_source("parquet", path=str(ok), image_column="label", cache=False)
    broken = pa.table({"img": pa.array([{"bytes": b"\xff\xd8garbage", "path": "a.jpg"}] * 3),
                       "label": pa.array([0, 1, 0])})
    pq.write_table(broken, tmp_path / "broken.parquet")
    with pytest.raises(BackdoorLabError, match="could not be decoded"):
        load_source("parquet", path=str(tmp_path / "broken.parquet"), cache=False)


def test_cifar10_reads_the_parquet_folder(tmp_path):
    d = tmp_path / "root" / "cifar10" / "parquet"
    d.mkdir(parents=True)
    x, y = _images(20, 5, size=32)
    _write(d / "train-00000-of-00001.parquet", x, y)
    _write(d / "test-00000-of-00001.parquet", x[:8], y[:8])
    raw = load_source("cifar10", root=str(tmp_path / "root"), full=True, cache=str(tmp_path / "c"))
    assert raw.train.num_classes == 10 and len(raw.train) == 20 and len(raw.test) == 8
    assert raw.train.name == "cifar10"
    # without the npz subset the parquet folder is read too; full=true without it is one clear error
    assert len(load_source("cifar10", root=str(tmp_path / "root"), cache=False).train) == 20
    with pytest.raises(BackdoorLabError, match="full=true"):
        load_source("cifar10", root=str(tmp_path / "other"), full=True)


def test_data_verb_json_table_figure_and_errors(shards, tmp_path):
    d, *_ = shards
    figs = tmp_path / "figs"
    r = CliRunner().invoke(app, ["data", "parquet", "--set", f"path={d}", "--set", f"cache={tmp_path / 'c'}",
                                 "--figures", str(figs), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert {"num_train", "num_test", "shape", "classes", "counts", "seconds"} <= set(doc)
    assert doc["num_train"] == 40 and doc["num_test"] == 12 and doc["shape"] == [3, 16, 16]
    assert doc["classes"] == CLASSES and doc["counts"]["train"] == [10, 10, 10, 10]
    png = list(figs.glob("*.png"))
    assert len(png) == 1 and png[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = CliRunner().invoke(app, ["data", "parquet", "--set", f"path={d}", "--set", "cache=false", "--figures", str(figs)])
    assert r.exit_code == 0 and "dog" in r.stdout and "40 train" in r.stdout
    bad = CliRunner().invoke(app, ["data", "parquet", "--set", f"path={tmp_path / 'missing'}"])
    assert bad.exit_code == 2 and "no such file or folder" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(app, ["data", "parquet", "--set", "path"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output
