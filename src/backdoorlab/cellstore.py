"""Grid cells in the results store (schema v2 tables ``grids`` and ``cells``).

A cell is one (data, model, attack, defense, seed) combination of a benchmark grid, keyed by a
deterministic ``cell_id``. Its life: ``running`` when dispatched, then ``done`` (pointing at a
run, written in the same transaction as the run itself) or ``failed`` (with the error). Resuming
skips ``done`` cells and redoes everything else; the primary key makes duplicates impossible.

A done cell whose run is gone (its record or its folder under ``runs/`` was deleted) is an
error wherever the cell's results are read (:meth:`CellStore.records`: report, ``bench``
output); ``bench`` itself first sets such cells back to ``failed``, with a warning, and redoes
them (:meth:`CellStore.forget_missing_runs`).

All database access goes through :class:`~backdoorlab.store.Store`'s public API.

Only one ``bench`` writes a store at a time: :func:`bench_lock` holds an exclusive ``flock`` on
``<store>/bench.lock`` (released by the kernel when the process dies, even on SIGKILL). Plain
``backdoorlab run`` commands still share the database through SQLite's busy timeout.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from backdoorlab.errors import BackdoorLabError
from backdoorlab.store import RunRecord, Store

CELL_RUN_PREFIX = "cell-"


@dataclass(frozen=True)
class CellRow:
    cell_id: str
    grid: str
    kind: str
    status: str
    run_id: str | None
    victim_key: str | None
    data: str
    model: str
    attack: str
    defense: str
    family: str
    seed: int
    error: str | None
    updated: float


_CELL_COLS = "cell_id, grid, kind, status, run_id, victim_key, data, model, attack, defense, family, seed, error, updated"


@contextmanager
def bench_lock(store: Store, wait: float = 0.0) -> Iterator[None]:
    """Exclusive right to run a grid against ``store``. Waits up to ``wait`` seconds for another
    ``bench`` to finish, then refuses with a clear error."""
    store.root.mkdir(parents=True, exist_ok=True)
    path = store.root / "bench.lock"
    fh = open(path, "a+")
    try:
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    holder = fh.read().strip() or "another process"
                    raise BackdoorLabError(
                        f"another `backdoorlab bench` ({holder}) is writing the store {store.root}; wait for it to "
                        "finish, pass --wait SECONDS to queue behind it, or use another --store") from None
                time.sleep(0.2)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        yield
    finally:
        fh.close()  # closing releases the lock


class CellStore:
    """Grid and cell bookkeeping on top of a :class:`Store` (through its public API only)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # ------------------------------------------------------------------ grids
    def save_grid(self, name: str, spec: dict[str, Any]) -> None:
        now = time.time()
        self.store.execute("INSERT INTO grids (name, spec_json, created, updated) VALUES (?,?,?,?) "
                           "ON CONFLICT(name) DO UPDATE SET spec_json=excluded.spec_json, updated=excluded.updated",
                           (name, json.dumps(spec, sort_keys=True), now, now))

    def grid_names(self) -> list[str]:
        return [r[0] for r in self.store.query("SELECT name FROM grids ORDER BY updated DESC")]

    def grid_spec(self, name: str) -> dict[str, Any] | None:
        row = self.store.query_one("SELECT spec_json FROM grids WHERE name=?", (name,))
        return json.loads(row[0]) if row else None

    # ------------------------------------------------------------------ cells
    def cells(self, grid: str | None = None, status: str | None = None) -> list[CellRow]:
        q, args = f"SELECT {_CELL_COLS} FROM cells WHERE 1=1", []
        if grid is not None:
            q += " AND grid=?"
            args.append(grid)
        if status is not None:
            q += " AND status=?"
            args.append(status)
        return [CellRow(*r) for r in self.store.query(q + " ORDER BY data, model, attack, seed, defense", args)]

    def done_ids(self, grid: str) -> set[str]:
        return {c.cell_id for c in self.cells(grid, "done")}

    def mark(self, cell: Any, status: str, error: str | None = None) -> None:
        """Set a (not finished) cell's status: ``running`` or ``failed``. A done cell is never touched."""
        with self.store.transaction() as con:
            self._upsert(con, cell, status, None, error)

    @staticmethod
    def _upsert(con: sqlite3.Connection, cell: Any, status: str, run_id: str | None, error: str | None) -> int:
        """Insert or update the cell's row unless it is done already; returns the rows changed (0 or 1)."""
        return con.execute(
            f"INSERT INTO cells ({_CELL_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(cell_id) DO UPDATE SET status=excluded.status, run_id=excluded.run_id, "
            "error=excluded.error, updated=excluded.updated WHERE cells.status != 'done'",
            (cell.cell_id, cell.grid, cell.kind, status, run_id, cell.victim_key, cell.data, cell.model, cell.attack,
             cell.defense, cell.family, cell.seed, error, time.time())).rowcount

    def commit_cell(self, cell: Any, record: RunRecord, tmp_dir: Path) -> RunRecord:
        """Store the cell's run (folder and records) and mark the cell done, in one transaction:
        all of it or none of it. A cell that is done already is refused (nothing is stored)."""
        with self.store.transaction() as con:
            rec = self.store.commit(record, tmp_dir)
            if self._upsert(con, cell, "done", rec.run_id, None) != 1:
                raise BackdoorLabError(f"cell {cell.cell_id} of grid {cell.grid!r} is done already; "
                                       f"its new run {rec.run_id} was not stored")
        return rec

    def cleanup(self) -> list[str]:
        """Remove what an interrupted bench left behind: temporary cell folders, and cell run folders
        that were moved into place but never indexed (the process died before the commit)."""
        runs_dir = self.store.runs_dir
        if not runs_dir.is_dir():
            return []
        known = {r[0] for r in self.store.query("SELECT run_id FROM runs WHERE run_id LIKE ?", (CELL_RUN_PREFIX + "%",))}
        removed = []
        for p in runs_dir.iterdir():
            if p.name.startswith(".tmp-" + CELL_RUN_PREFIX) or (p.name.startswith(CELL_RUN_PREFIX) and p.name not in known):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    # ------------------------------------------------------------------ the runs of done cells
    def _run_of(self, row: CellRow) -> tuple[RunRecord | None, str]:
        """A done cell's run, or ``(None, why it is missing)``."""
        if not row.run_id:
            return None, "its run record was deleted from the index (run id no longer known)"
        rec = self.store.find(row.run_id)
        if rec is None:
            return None, f"run {row.run_id} has no record in {self.store.db_path}"
        folder = self.store.run_folder(row.run_id)
        if not folder.is_dir():
            return None, f"the folder {folder} of run {row.run_id} is gone"
        return rec, ""

    def missing_runs(self, grid: str) -> list[tuple[CellRow, str]]:
        """The done cells of ``grid`` whose run is gone, each with the reason."""
        out = []
        for r in self.cells(grid, "done"):
            rec, why = self._run_of(r)
            if rec is None:
                out.append((r, why))
        return out

    def forget_missing_runs(self, grid: str) -> list[tuple[CellRow, str]]:
        """Set the done cells of ``grid`` whose run is gone back to ``failed`` (the error says why),
        so that ``bench`` redoes them. Returns those cells with the reason; the caller reports them.
        A run record whose folder is gone is left in the index (its metrics are still there)."""
        lost = self.missing_runs(grid)
        if lost:
            now = time.time()
            with self.store.transaction() as con:
                for r, why in lost:
                    con.execute("UPDATE cells SET status='failed', run_id=NULL, error=?, updated=? "
                                "WHERE cell_id=? AND status='done'",
                                (f"was done, but {why}; redone by the next `backdoorlab bench`", now, r.cell_id))
        return lost

    def records(self, rows: list[CellRow]) -> dict[str, RunRecord]:
        """The runs of the finished cells among ``rows``: cell_id -> RunRecord. A done cell whose run
        is gone (record or folder) raises :class:`BackdoorLabError` naming the cell, the run and the fix."""
        out = {}
        for r in rows:
            if r.status != "done":
                continue
            rec, why = self._run_of(r)
            if rec is None:
                raise BackdoorLabError(
                    f"cell {r.cell_id} of grid {r.grid!r} ({r.data}/{r.model}/{r.attack}/{r.defense}, seed {r.seed}) "
                    f"is done but its run {r.run_id or '(unknown)'} is missing: {why}. Rerun `backdoorlab bench` "
                    f"on the grid's YAML (grid {r.grid!r}) to redo that cell; the other cells are kept")
            out[r.cell_id] = rec
        return out
