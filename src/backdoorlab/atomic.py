"""Atomic writes: nothing half-written is ever visible.

A file is written through a temporary file in its folder, fsynced and moved into place with
``os.replace`` (:func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`);
a whole folder through a temporary sibling folder renamed into place (:func:`atomic_write_dir`).
These helpers are the one way backdoorlab writes results; :mod:`backdoorlab.store` re-exports them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from backdoorlab.errors import BackdoorLabError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (created/renamed files) durable; a no-op where folders cannot be fsynced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_dir(final: Path, files: dict[str, bytes], *, overwrite: bool = False) -> Path:
    """Write the folder ``final`` holding ``files`` (relative POSIX path -> bytes), all or nothing.

    Every file is written with :func:`atomic_write_bytes` (so fsynced) into a temporary sibling
    folder ``.<name>.tmp-XXXX``, the folders are fsynced, and the temporary folder is renamed to
    ``final``. On any error (including a value that is not bytes, checked before anything is
    written) the temporary folder is removed and ``final`` is left as it was. Returns ``final``.

    An existing *empty* ``final`` folder is replaced. An existing non-empty one is refused with a
    :class:`BackdoorLabError` unless ``overwrite=True``; then the old folder is renamed aside, the
    new one renamed into place (the old one is put back if that fails) and the old one deleted, so
    ``final`` holds either the complete old or the complete new contents, never a mix.
    """
    final = Path(final)
    items: list[tuple[PurePosixPath, bytes]] = []
    for rel, data in files.items():
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"atomic_write_dir({final}): {rel!r} must be bytes, not {type(data).__name__}")
        p = PurePosixPath(rel)
        if not rel or p.is_absolute() or ".." in p.parts or p == PurePosixPath("."):
            raise ValueError(f"atomic_write_dir({final}): {rel!r} is not a relative file path inside the folder")
        items.append((p, bytes(data)))
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise BackdoorLabError(f"{final} exists and is not a folder; remove it or choose another output folder")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise BackdoorLabError(f"{final} exists and is not empty; remove it or choose another output folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        dirs = {tmp}
        for p, data in items:
            target = tmp.joinpath(*p.parts)
            atomic_write_bytes(target, data)
            dirs.update(target.parents[i] for i in range(len(p.parts) - 1))
        for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
            _fsync_dir(d)
        if overwrite and final.is_dir() and any(final.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old)  # onto the empty placeholder folder
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)  # fails if a non-empty ``final`` appeared meanwhile
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
