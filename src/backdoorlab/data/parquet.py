"""Hugging Face image data sets stored as parquet (registry name ``parquet``).

The layout the Hugging Face hub uses for image classification sets (``datasets`` writes it, the
hub serves it as ``train-00000-of-0000N.parquet`` shards): one row per image, an image column of
``struct<bytes: binary, path: string>`` holding the encoded file (JPEG, PNG, ...) and an integer
label column. The schema metadata key ``huggingface`` declares the features; the ``ClassLabel``
feature carries the class names and the ``Image`` feature names the image column.

Reading: ``pyarrow`` reads the two columns, the encoded bytes are sliced out of the arrow buffer
(no copy) and decoded in one call (``torchvision.io.decode_jpeg`` takes a list and decodes the
batch; other formats go through ``decode_image``). The decoded uint8 (N, C, H, W) array and the
labels are cached as ``.npy`` files in a folder keyed by the SHA-256 of the whole parquet file
(plus its size and the decoding options); the next load hashes the file again (about 0.1 s per
50 MB) and memory-maps the cached arrays (``np.load(mmap_mode="c")``: copy-on-write, so a caller
that edits images never writes the cache). The footer alone would be cheaper to hash but is not
sound: it records page offsets and sizes, not the bytes, so two files whose JPEGs differ but have
the same lengths would collide.

Cache folder: ``data.cache`` if given (``false`` turns the cache off), else ``$BACKDOORLAB_CACHE``,
else ``$XDG_CACHE_HOME/backdoorlab`` (``~/.cache/backdoorlab``). Entries are written atomically
(:func:`backdoorlab.atomic.atomic_write_dir`); an unwritable cache folder only costs the speed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backdoorlab.data.sources import DATASETS, RawData
from backdoorlab.errors import BackdoorLabError
from backdoorlab.types import ImageSet

log = logging.getLogger(__name__)

CACHE_ENV = "BACKDOORLAB_CACHE"
_CACHE_VERSION = "1"
_MODES = ("auto", "rgb", "gray")


def default_cache_dir() -> Path:
    """``$BACKDOORLAB_CACHE``, else ``$XDG_CACHE_HOME/backdoorlab`` (``~/.cache/backdoorlab``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "backdoorlab"


def _cache_root(cache: Any) -> Path | None:
    if cache is False or (isinstance(cache, str) and cache.lower() in ("false", "off", "no", "none", "")):
        return None
    if cache is None or cache is True:
        return default_cache_dir()
    if isinstance(cache, (str, os.PathLike)):
        return Path(cache)
    raise BackdoorLabError(f"data.cache: give a folder, or false to turn the cache off; got {cache!r}")


def file_digest(path: Path) -> str:
    """SHA-256 (hex) of the whole file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- schema
def _hf_features(schema) -> dict[str, Any]:
    meta = schema.metadata or {}
    raw = meta.get(b"huggingface")
    if not raw:
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    feats = (doc.get("info") or {}).get("features") if isinstance(doc, dict) else None
    return feats if isinstance(feats, dict) else {}


def _columns(schema, image_column: str | None, label_column: str | None, where: str) -> tuple[str, str, tuple[str, ...]]:
    """(image column, label column, class names) from the options, the HF metadata, or the types."""
    import pyarrow as pa

    names = list(schema.names)
    feats = _hf_features(schema)

    def is_image(n: str) -> bool:
        t = schema.field(n).type
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0

    if image_column is None:
        declared = [n for n, f in feats.items() if isinstance(f, dict) and f.get("_type") == "Image" and n in names]
        found = declared or [n for n in names if is_image(n)]
        if not found:
            raise BackdoorLabError(f"{where}: no image column (struct<bytes, path>) among columns {names}; "
                                   "set data.image_column to the column holding the encoded images")
        image_column = found[0]
    elif image_column not in names:
        raise BackdoorLabError(f"{where}: no column {image_column!r} (columns: {names}); fix data.image_column")
    if not is_image(image_column):
        raise BackdoorLabError(f"{where}: column {image_column!r} is {schema.field(image_column).type}, not an image "
                               "column struct<bytes: binary, path: string>; set data.image_column")
    if label_column is None:
        declared = [n for n, f in feats.items() if isinstance(f, dict) and f.get("_type") == "ClassLabel" and n in names]
        found = declared or [n for n in ("label", "labels", "fine_label", "y") if n in names]
        if not found:
            raise BackdoorLabError(f"{where}: no label column among columns {names}; set data.label_column")
        label_column = found[0]
    elif label_column not in names:
        raise BackdoorLabError(f"{where}: no column {label_column!r} (columns: {names}); fix data.label_column")
    if not pa.types.is_integer(schema.field(label_column).type):
        raise BackdoorLabError(f"{where}: label column {label_column!r} is {schema.field(label_column).type}; "
                               "labels must be integers (a ClassLabel column)")
    feat = feats.get(label_column)
    classes: tuple[str, ...] = ()
    if isinstance(feat, dict) and isinstance(feat.get("names"), list):
        classes = tuple(str(c) for c in feat["names"])
    return image_column, label_column, classes


# ----------------------------------------------------------------------------- decoding
def _encoded(column) -> list[torch.Tensor]:
    """The encoded image bytes of a struct<bytes, path> column, as uint8 views (no copy)."""
    import pyarrow as pa

    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    if isinstance(arr, pa.ChunkedArray):  # an empty table
        arr = pa.concat_arrays(arr.chunks) if arr.num_chunks else pa.array([], type=arr.type)
    b = arr.flatten()[arr.type.get_field_index("bytes")]  # flatten (not field) applies the struct's offset
    if b.null_count:
        raise BackdoorLabError(f"{b.null_count} rows have no image bytes (only a path); this reader needs the "
                               "images embedded in the parquet file (datasets' push_to_hub / to_parquet embed them)")
    if not (pa.types.is_binary(b.type) or pa.types.is_large_binary(b.type)):
        raise BackdoorLabError(f"the image bytes field is {b.type}, not binary")
    off_dtype = np.int64 if pa.types.is_large_binary(b.type) else np.int32
    _, offsets_buf, data_buf = b.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=off_dtype)[b.offset:b.offset + len(b) + 1].astype(np.int64)
    if data_buf is None or len(b) == 0:
        return []
    data = torch.frombuffer(memoryview(data_buf), dtype=torch.uint8) if data_buf.size else torch.empty(0, dtype=torch.uint8)
    starts, ends = offsets[:-1].tolist(), offsets[1:].tolist()
    return [data[s:e] for s, e in zip(starts, ends)]


def decode_images(encoded: list[torch.Tensor], mode: str = "auto", where: str = "images") -> torch.Tensor:
    """Decode encoded images (JPEG in one batched call; PNG/others one by one) to uint8 (N, C, H, W).
    ``mode``: ``rgb``, ``gray`` or ``auto`` (gray when the first image has one channel)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    if mode not in _MODES:
        raise BackdoorLabError(f"data.mode: use one of {', '.join(_MODES)}; got {mode!r}")
    if not encoded:
        raise BackdoorLabError(f"{where}: no images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": decoding only reads it
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec; still works
        try:
            if mode == "auto":
                first = decode_image(encoded[0], mode=ImageReadMode.UNCHANGED)
                mode = "gray" if first.shape[0] in (1, 2) else "rgb"
            read = ImageReadMode.GRAY if mode == "gray" else ImageReadMode.RGB
            jpeg = all(t.numel() > 2 and int(t[0]) == 0xFF and int(t[1]) == 0xD8 for t in encoded[:64])
            if jpeg:
                images = decode_jpeg(encoded, mode=read)
            else:
                images = [decode_image(t, mode=read) for t in encoded]
        except RuntimeError as exc:
            from backdoorlab.validate import exception_summary

            raise BackdoorLabError(f"{where}: an image could not be decoded ({exception_summary(exc)}); "
                                   "the image column must hold JPEG/PNG files") from None
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) > 1:
        raise BackdoorLabError(f"{where}: images have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); "
                               "resize them to one size before use")
    return torch.stack(images)


# ----------------------------------------------------------------------------- one file
def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getbuffer()


def _read_file(path: Path, *, image_column: str | None, label_column: str | None, mode: str,
               cache: Path | None) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """Images uint8 (N, C, H, W), labels int64 (N,) and class names of one parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = str(path)
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise BackdoorLabError(f"{where} is not a readable parquet file ({' '.join(str(exc).split())[:200]}); "
                               "give a .parquet file in the Hugging Face image layout") from None
    img_col, lab_col, classes = _columns(pf.schema_arrow, image_column, label_column, where)
    entry = None
    if cache is not None:
        key = hashlib.sha256(
            f"{_CACHE_VERSION}|{file_digest(path)}|{path.stat().st_size}|{img_col}|{lab_col}|{mode}".encode()
        ).hexdigest()[:40]
        entry = cache / "parquet" / key
        if (entry / "meta.json").is_file():
            try:
                x = np.load(entry / "x.npy", mmap_mode="c", allow_pickle=False)
                y = np.load(entry / "y.npy", allow_pickle=False)
                meta = json.loads((entry / "meta.json").read_text())
                log.debug("%s: decoded images from the cache %s", path, entry)
                return torch.from_numpy(x), torch.from_numpy(y), tuple(meta.get("classes", ()))
            except (OSError, ValueError) as exc:
                log.warning("ignoring a damaged cache entry %s (%s); decoding again", entry, exc)
    try:
        table = pf.read(columns=[img_col, lab_col])
    except (pa.ArrowException, OSError) as exc:
        raise BackdoorLabError(f"{where}: cannot read columns {img_col!r}, {lab_col!r} "
                               f"({' '.join(str(exc).split())[:200]})") from None
    labels = table.column(lab_col)
    if labels.null_count:
        raise BackdoorLabError(f"{where}: {labels.null_count} rows have no label")
    y = torch.from_numpy(labels.to_numpy().astype(np.int64))
    try:
        enc = _encoded(table.column(img_col))
    except BackdoorLabError as exc:
        raise BackdoorLabError(f"{where}: column {img_col!r}: {exc}") from None
    x = decode_images(enc, mode, where)
    if entry is not None:
        from backdoorlab.atomic import atomic_write_dir

        try:
            atomic_write_dir(entry, {
                "x.npy": _npy_bytes(x.numpy()), "y.npy": _npy_bytes(y.numpy()),
                "meta.json": json.dumps({"source": str(path), "classes": list(classes), "shape": list(x.shape),
                                         "image_column": img_col, "label_column": lab_col}).encode(),
            }, overwrite=True)
        except (OSError, BackdoorLabError) as exc:
            log.warning("cannot write the decoded-image cache %s (%s); set data.cache or $%s", entry, exc, CACHE_ENV)
    return x, y, classes


# ----------------------------------------------------------------------------- files -> ImageSet
def split_files(path: str | Path) -> tuple[list[Path], list[Path]]:
    """The train and test shards of ``path``: a file is a train set alone; a folder holds
    ``train-*.parquet`` and ``test-*.parquet`` (or ``data/`` with them, as on the hub)."""
    p = Path(path)
    if p.is_file():
        return [p], []
    if not p.is_dir():
        raise BackdoorLabError(f"data.path: no such file or folder: {p}. Give a .parquet file or a folder "
                               "holding train-*.parquet and test-*.parquet shards")
    for d in (p, p / "data"):
        train = sorted(d.glob("train-*.parquet")) + sorted(d.glob("train.parquet"))
        if train:
            test = sorted(d.glob("test-*.parquet")) + sorted(d.glob("test.parquet"))
            return train, test
    found = sorted(q.name for q in p.iterdir())[:8]
    raise BackdoorLabError(f"data.path: {p} holds no train-*.parquet shard (found: {found}); give a folder with "
                           "train-*.parquet [and test-*.parquet] shards, or one .parquet file")


def read_imageset(files: list[Path], *, name: str, num_classes: int | None = None, image_column: str | None = None,
                  label_column: str | None = None, mode: str = "auto", cache: Any = None) -> ImageSet:
    """The ImageSet of the parquet ``files`` (shards of one split, in order)."""
    from backdoorlab.validate import class_count

    if mode not in _MODES:
        raise BackdoorLabError(f"data.mode: use one of {', '.join(_MODES)}; got {mode!r}")
    root = _cache_root(cache)
    parts = [_read_file(f, image_column=image_column, label_column=label_column, mode=mode, cache=root) for f in files]
    shapes = {tuple(x.shape[1:]) for x, _, _ in parts}
    if len(shapes) > 1:
        raise BackdoorLabError(f"{name}: shards have images of different shapes {sorted(shapes)}; use one image size")
    x = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])  # one shard stays memory-mapped
    y = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
    classes = next((c for _, _, c in parts if c), ())
    k = class_count([y.numpy()], name, num_classes or (len(classes) or None))
    if classes and len(classes) != k:
        classes = ()
    return ImageSet(x, y, k, classes, name)


@DATASETS.register("parquet", "a Hugging Face image data set as parquet: path = a .parquet file or a folder of "
                   "train-*/test-*.parquet shards; decoded images cached (data.cache)")
def parquet(path: str, test_path: str | None = None, num_classes: int | None = None, image_column: str | None = None,
            label_column: str | None = None, mode: str = "auto", cache: Any = None) -> RawData:
    train_files, test_files = split_files(path)
    if test_path is not None:
        test_files, extra = split_files(test_path)
        test_files = test_files + extra
    opts = dict(image_column=image_column, label_column=label_column, mode=mode, cache=cache)
    stem = Path(path).stem if Path(path).is_file() else Path(path).name
    train = read_imageset(train_files, name=stem, num_classes=num_classes, **opts)
    test = None
    if test_files:
        test = read_imageset(test_files, name=f"{stem}-test", num_classes=num_classes or train.num_classes, **opts)
        if test.shape != train.shape:
            raise BackdoorLabError(f"test images have shape {test.shape} but train images {train.shape}; use one image size")
    return RawData(train, test)
