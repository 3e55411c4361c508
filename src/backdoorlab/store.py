"""Results store: one SQLite database (``runs``, ``metrics``, ``artifacts``) plus a folder per run.

Layout under ``root`` (default ``./backdoorlab-runs`` or ``$BACKDOORLAB_HOME``)::

    backdoorlab.db          the index (schema version in PRAGMA user_version)
    runs/<run_id>/          config.yaml, metrics.json, weights.safetensors, model.json, figures/
    cache/<key>.safetensors trained victims, keyed by a hash of what determines them

Nothing half-written is ever visible: a run is assembled in ``runs/.tmp-<id>`` and renamed into
place, then indexed in one transaction; if either step fails, both are undone. Files are written
through a temporary file and ``os.replace``.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from backdoorlab.errors import BackdoorLabError

SCHEMA_VERSION = 2
HOME_ENV = "BACKDOORLAB_HOME"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    seconds REAL NOT NULL,
    config_json TEXT NOT NULL,
    victim_key TEXT,
    run_dir TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, key)
);
CREATE TABLE IF NOT EXISTS artifacts (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (run_id, kind)
);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created);
"""

# Additive migrations: version -> SQL that brings a database from version-1 to version.
_MIGRATIONS = {
    # 2: benchmark grids (``backdoorlab bench``): the grid specs and one row per grid cell, keyed by
    # a deterministic cell id; a finished cell points at its run (see backdoorlab.cellstore).
    2: """
CREATE TABLE IF NOT EXISTS grids (
    name TEXT PRIMARY KEY,
    spec_json TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cells (
    cell_id TEXT PRIMARY KEY,
    grid TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    run_id TEXT REFERENCES runs(run_id) ON DELETE SET NULL,
    victim_key TEXT,
    data TEXT NOT NULL,
    model TEXT NOT NULL,
    attack TEXT NOT NULL,
    defense TEXT NOT NULL,
    family TEXT NOT NULL,
    seed INTEGER NOT NULL,
    error TEXT,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cells_grid ON cells(grid);
""",
}


@dataclass(frozen=True)
class RunRecord:
    """One stored run (immutable)."""

    run_id: str
    name: str
    kind: str
    created: float
    status: str
    seconds: float
    config: dict[str, Any]
    metrics: dict[str, float]
    artifacts: dict[str, str] = field(default_factory=dict)
    victim_key: str | None = None
    run_dir: str = ""

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"run_id": self.run_id, "name": self.name, "kind": self.kind, "status": self.status,
                               "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created)),
                               "seconds": round(self.seconds, 3), "run_dir": self.run_dir}
        out.update(self.metrics)
        return out


def default_home() -> Path:
    return Path(os.environ.get(HOME_ENV, "backdoorlab-runs"))


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


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def new_run_id(name: str = "") -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{os.urandom(3).hex()}"


class Store:
    """The SQLite index plus run folders under ``root``."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_home()
        self.db_path = self.root / "backdoorlab.db"
        self.runs_dir = self.root / "runs"
        self.cache_dir = self.root / "cache"
        self._init_db()

    # ------------------------------------------------------------------ database
    def _connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(self.db_path, timeout=60.0, isolation_level=None)
            con.execute("PRAGMA foreign_keys = ON")
            con.execute("PRAGMA busy_timeout = 60000")
            return con
        except sqlite3.Error as exc:
            raise BackdoorLabError(f"cannot open the results database {self.db_path}: {exc}") from exc

    def _init_db(self) -> None:
        if self.db_path.exists():
            with open(self.db_path, "rb") as fh:
                head = fh.read(16)
            if head and head != b"SQLite format 3\x00":
                raise BackdoorLabError(f"{self.db_path} is not an SQLite database; move it away or choose another --store")
        self.root.mkdir(parents=True, exist_ok=True)
        con = self._connect()
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise BackdoorLabError(
                    f"{self.db_path} has schema version {version}, newer than this backdoorlab ({SCHEMA_VERSION}); "
                    "upgrade backdoorlab or use another --store")
            if version < SCHEMA_VERSION:
                steps = "\n".join(_MIGRATIONS[v] for v in range(max(version, 1) + 1, SCHEMA_VERSION + 1))
                con.executescript(f"BEGIN IMMEDIATE;\n{_SCHEMA}\n{steps}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")
        except sqlite3.DatabaseError as exc:
            raise BackdoorLabError(f"{self.db_path} is not a readable backdoorlab database ({exc})") from exc
        finally:
            con.close()

    # ------------------------------------------------------------------ runs
    @contextmanager
    def new_run(self, run_id: str) -> Iterator[Path]:
        """A temporary folder for a run's files; removed if the block raises."""
        tmp = self.runs_dir / f".tmp-{run_id}"
        tmp.mkdir(parents=True, exist_ok=False)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def commit(self, record: RunRecord, tmp_dir: Path, also: Callable[[sqlite3.Connection], None] | None = None) -> RunRecord:
        """Move ``tmp_dir`` into place and index the run in one transaction (both or neither).
        ``also(con)``, when given, runs inside that transaction (e.g. to mark a grid cell done)."""
        final = self.runs_dir / record.run_id
        if final.exists():
            raise BackdoorLabError(f"run {record.run_id} exists already")
        os.replace(tmp_dir, final)
        rec = RunRecord(**{**record.__dict__, "run_dir": str(final)})
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute(
                "INSERT INTO runs (run_id, name, kind, created, status, seconds, config_json, victim_key, run_dir)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (rec.run_id, rec.name, rec.kind, rec.created, rec.status, rec.seconds,
                 json.dumps(rec.config, sort_keys=True, default=_json_default), rec.victim_key, rec.run_dir),
            )
            con.executemany("INSERT INTO metrics (run_id, key, value) VALUES (?,?,?)",
                            [(rec.run_id, k, float(v)) for k, v in rec.metrics.items()])
            con.executemany("INSERT INTO artifacts (run_id, kind, path) VALUES (?,?,?)",
                            [(rec.run_id, k, v) for k, v in rec.artifacts.items()])
            if also is not None:
                also(con)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            shutil.rmtree(final, ignore_errors=True)
            raise
        finally:
            con.close()
        return rec

    def _record(self, con: sqlite3.Connection, row: tuple) -> RunRecord:
        run_id = row[0]
        metrics = dict(con.execute("SELECT key, value FROM metrics WHERE run_id=? ORDER BY key", (run_id,)).fetchall())
        arts = dict(con.execute("SELECT kind, path FROM artifacts WHERE run_id=? ORDER BY kind", (run_id,)).fetchall())
        return RunRecord(run_id=row[0], name=row[1], kind=row[2], created=row[3], status=row[4], seconds=row[5],
                         config=json.loads(row[6]), victim_key=row[7], run_dir=row[8], metrics=metrics, artifacts=arts)

    _COLS = "run_id, name, kind, created, status, seconds, config_json, victim_key, run_dir"

    def runs(self, limit: int | None = None) -> list[RunRecord]:
        con = self._connect()
        try:
            q = f"SELECT {self._COLS} FROM runs ORDER BY created DESC"
            rows = con.execute(q + (f" LIMIT {int(limit)}" if limit else "")).fetchall()
            return [self._record(con, r) for r in rows]
        finally:
            con.close()

    def get(self, run_id: str) -> RunRecord:
        """The run with this id (or a unique prefix of it)."""
        con = self._connect()
        try:
            rows = con.execute(f"SELECT {self._COLS} FROM runs WHERE run_id LIKE ? ORDER BY created",
                               (run_id.replace("%", "") + "%",)).fetchall()
            if not rows:
                raise BackdoorLabError(f"no run {run_id!r} in {self.db_path}; `backdoorlab runs` lists them")
            exact = [r for r in rows if r[0] == run_id]
            if len(rows) > 1 and not exact:
                raise BackdoorLabError(f"run id prefix {run_id!r} is ambiguous: {', '.join(r[0] for r in rows[:5])}")
            return self._record(con, exact[0] if exact else rows[0])
        finally:
            con.close()

    # ------------------------------------------------------------------ cache
    def cache_path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.safetensors"
