"""Grid cells in the results store (schema v2 tables ``grids`` and ``cells``).

A cell is one (data, model, attack, defense, seed) combination of a benchmark grid, keyed by a
deterministic ``cell_id``. Its life: ``running`` when dispatched, then ``done`` (pointing at a
run, written in the same transaction as the run itself) or ``failed`` (with the error). Resuming
skips ``done`` cells and redoes everything else; the primary key makes duplicates impossible.

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
    """Grid and cell bookkeeping on top of a :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # ------------------------------------------------------------------ grids
    def save_grid(self, name: str, spec: dict[str, Any]) -> None:
        now = time.time()
        con = self.store._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO grids (name, spec_json, created, updated) VALUES (?,?,?,?) "
                        "ON CONFLICT(name) DO UPDATE SET spec_json=excluded.spec_json, updated=excluded.updated",
                        (name, json.dumps(spec, sort_keys=True), now, now))
            con.execute("COMMIT")
        finally:
            con.close()

    def grid_names(self) -> list[str]:
        con = self.store._connect()
        try:
            return [r[0] for r in con.execute("SELECT name FROM grids ORDER BY updated DESC").fetchall()]
        finally:
            con.close()

    def grid_spec(self, name: str) -> dict[str, Any] | None:
        con = self.store._connect()
        try:
            row = con.execute("SELECT spec_json FROM grids WHERE name=?", (name,)).fetchone()
            return json.loads(row[0]) if row else None
        finally:
            con.close()

    # ------------------------------------------------------------------ cells
    def cells(self, grid: str | None = None, status: str | None = None) -> list[CellRow]:
        q, args = f"SELECT {_CELL_COLS} FROM cells WHERE 1=1", []
        if grid is not None:
            q += " AND grid=?"
            args.append(grid)
        if status is not None:
            q += " AND status=?"
            args.append(status)
        con = self.store._connect()
        try:
            return [CellRow(*r) for r in con.execute(q + " ORDER BY data, model, attack, seed, defense", args).fetchall()]
        finally:
            con.close()

    def done_ids(self, grid: str) -> set[str]:
        return {c.cell_id for c in self.cells(grid, "done")}

    def mark(self, cell: Any, status: str, error: str | None = None) -> None:
        """Set a (not finished) cell's status: ``running`` or ``failed``. A done cell is never touched."""
        con = self.store._connect()
        try:
            con.execute("BEGIN IMMEDIATE")
            self._upsert(con, cell, status, None, error)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()

    @staticmethod
    def _upsert(con: sqlite3.Connection, cell: Any, status: str, run_id: str | None, error: str | None) -> None:
        con.execute(
            f"INSERT INTO cells ({_CELL_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(cell_id) DO UPDATE SET status=excluded.status, run_id=excluded.run_id, "
            "error=excluded.error, updated=excluded.updated WHERE cells.status != 'done'",
            (cell.cell_id, cell.grid, cell.kind, status, run_id, cell.victim_key, cell.data, cell.model, cell.attack,
             cell.defense, cell.family, cell.seed, error, time.time()))

    def commit_cell(self, cell: Any, record: RunRecord, tmp_dir: Path) -> RunRecord:
        """Store the cell's run and mark the cell done, in one transaction."""
        return self.store.commit(record, tmp_dir, also=lambda con: self._upsert(con, cell, "done", record.run_id, None))

    def cleanup(self) -> list[str]:
        """Remove what an interrupted bench left behind: temporary cell folders, and cell run folders
        that were moved into place but never indexed (the process died before the commit)."""
        runs_dir = self.store.runs_dir
        if not runs_dir.is_dir():
            return []
        con = self.store._connect()
        try:
            known = {r[0] for r in con.execute("SELECT run_id FROM runs WHERE run_id LIKE ?", (CELL_RUN_PREFIX + "%",))}
        finally:
            con.close()
        removed = []
        for p in runs_dir.iterdir():
            if p.name.startswith(".tmp-" + CELL_RUN_PREFIX) or (p.name.startswith(CELL_RUN_PREFIX) and p.name not in known):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        return removed

    def records(self, rows: list[CellRow]) -> dict[str, RunRecord]:
        """The runs of the finished cells among ``rows``: cell_id -> RunRecord."""
        out = {}
        for r in rows:
            if r.status == "done" and r.run_id:
                try:
                    out[r.cell_id] = self.store.get(r.run_id)
                except BackdoorLabError:
                    continue
        return out
