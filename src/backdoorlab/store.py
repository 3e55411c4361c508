"""Results store: one SQLite database (``runs``, ``metrics``, ``artifacts``) plus a folder per run.

Layout under ``root`` (default ``./backdoorlab-runs`` or ``$BACKDOORLAB_HOME``)::

    backdoorlab.db          the index (schema version in PRAGMA user_version)
    runs/<run_id>/          config.yaml, metrics.json, weights.safetensors, model.json, figures/
    cache/<key>.safetensors trained victims, keyed by a hash of what determines them

Nothing half-written is ever visible: a run is assembled in ``runs/.tmp-<id>`` and renamed into
place, then indexed in one transaction; if either step fails, both are undone. Files are written
through a temporary file and ``os.replace`` (:func:`atomic_write_bytes` and friends), whole
folders through a temporary sibling folder (:func:`atomic_write_dir`): these helpers, in
:mod:`backdoorlab.atomic` and re-exported here, are the one way backdoorlab writes results.

The database is reached only through :class:`Store`'s public methods: :meth:`Store.transaction`
(re-entrant ``BEGIN IMMEDIATE`` ... ``COMMIT``/``ROLLBACK``), :meth:`Store.execute`,
:meth:`Store.query` / :meth:`Store.query_one`, :meth:`Store.commit` (a run folder and its
records), :meth:`Store.get` / :meth:`Store.find` / :meth:`Store.runs`.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from backdoorlab.atomic import (  # noqa: F401  (re-exported: the one way backdoorlab writes results)
    _json_default, atomic_write_bytes, atomic_write_dir, atomic_write_json, atomic_write_text,
)
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


def new_run_id(name: str = "") -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{os.urandom(3).hex()}"


class _Tx:
    """The open transaction of one thread: its connection, savepoint depth and rollback actions."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con
        self.depth = 0
        self.undo: list[Callable[[], None]] = []

    def run_undo(self, start: int = 0) -> None:
        actions, self.undo[start:] = self.undo[start:], []
        for fn in reversed(actions):
            try:
                fn()
            except Exception:  # an undo step must not hide the error that caused the rollback
                pass


class Store:
    """The SQLite index plus run folders under ``root``.

    A ``Store`` opens a short-lived connection per operation (safe across processes; SQLite's busy
    timeout serialises writers). Transactions are per thread: see :meth:`transaction`.
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_home()
        self.db_path = self.root / "backdoorlab.db"
        self.runs_dir = self.root / "runs"
        self.cache_dir = self.root / "cache"
        self._local = threading.local()
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

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: ``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` if the block
        raises (the exception propagates). Yields the ``sqlite3.Connection`` (autocommit mode; do not
        call ``commit``/``rollback`` on it, and do not keep it past the block).

        Re-entrant within a thread: a ``transaction()`` opened inside another one (including the
        ones :meth:`commit` and :meth:`execute` open) joins it as a ``SAVEPOINT``. An inner block
        that raises undoes only its own statements; nothing is durable until the outermost block
        commits. Run folders that :meth:`commit` moved into place are removed again by any rollback
        that undoes their records, so a run is stored with both its folder and its rows, or not at all.
        """
        tx: _Tx | None = getattr(self._local, "tx", None)
        if tx is None:
            con = self._connect()
            try:
                con.execute("BEGIN IMMEDIATE")
            except BaseException:
                con.close()
                raise
            tx = self._local.tx = _Tx(con)
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                try:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                tx.run_undo()
                raise
            finally:
                self._local.tx = None
                con.close()
        else:
            con, mark = tx.con, len(tx.undo)
            name = f"backdoorlab_sp{tx.depth}"
            tx.depth += 1
            try:
                con.execute(f"SAVEPOINT {name}")
                try:
                    yield con
                    con.execute(f"RELEASE {name}")
                except BaseException:
                    try:
                        con.execute(f"ROLLBACK TO {name}")
                        con.execute(f"RELEASE {name}")
                    except sqlite3.Error:
                        pass
                    tx.run_undo(mark)
                    raise
            finally:
                tx.depth -= 1

    def _on_rollback(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` if the current transaction (level) is rolled back."""
        self._local.tx.undo.append(fn)

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The current transaction's connection (so reads see its own writes), else a fresh one."""
        tx: _Tx | None = getattr(self._local, "tx", None)
        if tx is not None:
            yield tx.con
            return
        con = self._connect()
        try:
            yield con
        finally:
            con.close()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one writing statement in its own transaction (or as part of the current one, see
        :meth:`transaction`); returns the number of rows it changed."""
        with self.transaction() as con:
            return con.execute(sql, params).rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """All rows of a reading statement (inside a :meth:`transaction` block, it sees the block's writes)."""
        with self._reading() as con:
            return con.execute(sql, params).fetchall()

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        """The first row of a reading statement, or ``None``."""
        with self._reading() as con:
            return con.execute(sql, params).fetchone()

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
        """Index the run and move ``tmp_dir`` (from :meth:`new_run`) to ``runs/<run_id>``, in one
        transaction: both or neither. If anything fails, ``tmp_dir`` is removed too.

        Called inside a :meth:`transaction` block, it joins that transaction: the run and the
        block's other statements commit together, and if the block raises afterwards the run's rows
        are rolled back *and* its folder removed. ``also(con)``, when given, runs inside the same
        transaction (shorthand for wrapping the call in ``with store.transaction() as con:``)."""
        final = self.runs_dir / record.run_id
        rec = RunRecord(**{**record.__dict__, "run_dir": str(final)})
        try:
            with self.transaction() as con:
                if final.exists():
                    raise BackdoorLabError(f"run {record.run_id} exists already")
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
                os.replace(tmp_dir, final)
                self._on_rollback(lambda: shutil.rmtree(final, ignore_errors=True))
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        return rec

    def _record(self, con: sqlite3.Connection, row: tuple) -> RunRecord:
        run_id = row[0]
        metrics = dict(con.execute("SELECT key, value FROM metrics WHERE run_id=? ORDER BY key", (run_id,)).fetchall())
        arts = dict(con.execute("SELECT kind, path FROM artifacts WHERE run_id=? ORDER BY kind", (run_id,)).fetchall())
        return RunRecord(run_id=row[0], name=row[1], kind=row[2], created=row[3], status=row[4], seconds=row[5],
                         config=json.loads(row[6]), victim_key=row[7], run_dir=row[8], metrics=metrics, artifacts=arts)

    _COLS = "run_id, name, kind, created, status, seconds, config_json, victim_key, run_dir"

    def runs(self, limit: int | None = None) -> list[RunRecord]:
        with self._reading() as con:
            q = f"SELECT {self._COLS} FROM runs ORDER BY created DESC"
            rows = con.execute(q + (f" LIMIT {int(limit)}" if limit else "")).fetchall()
            return [self._record(con, r) for r in rows]

    def find(self, run_id: str) -> RunRecord | None:
        """The run with exactly this id, or ``None`` (no prefix matching; see :meth:`get`)."""
        with self._reading() as con:
            row = con.execute(f"SELECT {self._COLS} FROM runs WHERE run_id=?", (run_id,)).fetchone()
            return self._record(con, row) if row else None

    def run_folder(self, run_id: str) -> Path:
        """Where the run ``run_id``'s files are (whether or not it exists)."""
        return self.runs_dir / run_id

    def get(self, run_id: str) -> RunRecord:
        """The run with this id (or a unique prefix of it)."""
        with self._reading() as con:
            rows = con.execute(f"SELECT {self._COLS} FROM runs WHERE run_id LIKE ? ORDER BY created",
                               (run_id.replace("%", "") + "%",)).fetchall()
            if not rows:
                raise BackdoorLabError(f"no run {run_id!r} in {self.db_path}; `backdoorlab runs` lists them")
            exact = [r for r in rows if r[0] == run_id]
            if len(rows) > 1 and not exact:
                raise BackdoorLabError(f"run id prefix {run_id!r} is ambiguous: {', '.join(r[0] for r in rows[:5])}")
            return self._record(con, exact[0] if exact else rows[0])

    # ------------------------------------------------------------------ cache
    def cache_path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.safetensors"
