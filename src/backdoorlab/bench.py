"""The grid driver: ``run_grid(grid, store, engine) -> summary``.

It holds the store's bench lock, records the grid, cleans up what an interrupted run left
behind, sets back (with a warning) the ``done`` cells whose run was deleted, skips the cells
already ``done``, sends the victims to the engine, and as each victim
comes back stores it (run folder + cell row in one transaction), caches its weights and sends
its defenses. Tasks never write; this driver alone does.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from backdoorlab.cellstore import CELL_RUN_PREFIX, CellStore, bench_lock
from backdoorlab.engines import CellOutcome, Engine, VictimPayload, defense_task, group_task, victim_task
from backdoorlab.grid import Cell, Grid, VictimGroup
from backdoorlab.store import RunRecord, Store, atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

Progress = Callable[..., None]


@dataclass
class GridSummary:
    grid: str
    engine: str
    workers: int
    total: int
    skipped: int = 0
    done: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)  # cell title -> error
    trained: int = 0  # victims trained (not loaded from the cache)

    def as_dict(self) -> dict[str, Any]:
        return {"grid": self.grid, "engine": self.engine, "workers": self.workers, "cells": self.total,
                "skipped": self.skipped, "done": self.done, "failed": self.failed, "victims_trained": self.trained,
                "seconds": round(self.seconds, 3), "failures": self.failures}


def _store_cell(cs: CellStore, cell: Cell, o: CellOutcome) -> RunRecord:
    from backdoorlab.records import write_run

    run_id = f"{CELL_RUN_PREFIX}{cell.cell_id[:12]}-{os.urandom(3).hex()}"
    prefix = "" if cell.kind == "victim" else f"{cell.defense}_"
    return write_run(cs.store, run_id, kind="cell", config=cell.config, metrics=o.metrics, seconds=o.seconds,
                     name=cell.config.name if cell.kind == "victim" else f"{cell.config.name}/{cell.defense}",
                     figures={f"{prefix}{k}": v for k, v in o.figures.items()}, weights=o.weights, history=o.history,
                     extra_json={"cell": {"cell_id": cell.cell_id, "grid": cell.grid, "kind": cell.kind,
                                          "family": cell.family, **cell.labels()}},
                     commit=lambda rec, tmp: cs.commit_cell(cell, rec, tmp))


def _defense(cell: Cell) -> Any:
    from backdoorlab.defenses import DEFENSES

    d = cell.config.defenses[0]
    return DEFENSES.build(d.name, d.extras(), where=f"defense {cell.defense}")


def chain_defenses(cells: list[Cell]) -> list[list[Cell]]:
    """Tasks for a victim's pending defense cells: one per cell, except that a cleanser whose own
    inspector (:meth:`Cleanser.inspector`) equals a pending inspector cell runs after it, in the same
    task, reusing that inspection (pattern subtraction re-runs the whole pairwise scan otherwise). Only exact
    equality of the inspector's parameters chains, so no result depends on the chaining."""
    tasks: list[list[Cell]] = [[c] for c in cells]
    inspectors = [t for t in tasks if t[0].family == "inspector"]
    for t in list(tasks):
        c = t[0]
        own = _defense(c).inspector() if c.family == "cleanser" else None
        if own is None:
            continue
        for chain in inspectors:
            if _defense(chain[0]) == own:
                chain.append(c)
                tasks.remove(t)
                break
    return tasks


def run_grid(grid: Grid, store: Store, engine: Engine, progress: Progress | None = None,
             lock_wait: float = 0.0) -> GridSummary:
    """Run every cell of ``grid`` not yet done in ``store``; returns the counts."""
    progress = progress or (lambda *a, **k: None)
    t0 = time.perf_counter()
    with bench_lock(store, lock_wait):
        cs = CellStore(store)
        removed = cs.cleanup()
        if removed:
            log.info("removed %d half-written cell folder(s) of an interrupted run", len(removed))
        cs.save_grid(grid.name, grid.spec.model_dump(mode="json"))
        # A done cell whose run was deleted is redone, explicitly: it is set back to failed and logged.
        for row, why in cs.forget_missing_runs(grid.name):
            log.warning("cell %s (%s/%s/%s/%s, seed %s) was done but %s; redoing it", row.cell_id, row.data,
                        row.model, row.attack, row.defense, row.seed, why)
        done = cs.done_ids(grid.name)
        cells = grid.cells
        summary = GridSummary(grid.name, engine.name, engine.workers, len(cells))
        summary.skipped = sum(c.cell_id in done for c in cells)
        by_id = {c.cell_id: c for c in cells}
        pending_total = len(cells) - summary.skipped
        progress("start", total=pending_total, skipped=summary.skipped, grid=grid.name)
        handles: dict[Any, tuple[str, VictimGroup, list[Cell]]] = {}
        threads = engine.threads()

        def submit(kind: str, g: VictimGroup, task_cells: list[Cell], fn, *args) -> None:
            for c in task_cells:
                cs.mark(c, "running")
            handles[engine.submit(fn, *args)] = (kind, g, task_cells)
            progress("running", n=sum(len(v[2]) for v in handles.values()))

        def submit_defenses(g: VictimGroup, payload: VictimPayload) -> None:
            todo = [c for c in g.defenses if c.cell_id not in done]
            if not todo:
                return
            shared = engine.share(payload)
            for chain in chain_defenses(todo):
                submit("defense", g, chain, defense_task, [(c.cell_id, c.config.model_dump_json()) for c in chain],
                       shared, threads)

        try:
            for g in grid.groups:
                todo = [c for c in g.cells if c.cell_id not in done]
                if not todo:
                    continue
                cfg = g.victim.config
                if g.training_attack:
                    submit("group", g, todo, group_task, g.victim.cell_id, cfg.model_dump_json(),
                           [(c.cell_id, c.config.model_dump_json()) for c in g.defenses if c.cell_id not in done], threads)
                    continue
                cache = store.cache_path(cfg.victim_key()) if cfg.cache else None
                cached = cache.read_bytes() if cache is not None and cache.is_file() else None
                if g.victim.cell_id in done and cached is not None:
                    row = [r for r in cs.cells(grid.name, "done") if r.cell_id == g.victim.cell_id][0]
                    submit_defenses(g, VictimPayload(cached, store.get(row.run_id).metrics))
                else:
                    submit("victim", g, [g.victim], victim_task, g.victim.cell_id, cfg.model_dump_json(), cached, threads)

            while handles:
                for h, result in engine.wait(list(handles)):
                    kind, g, task_cells = handles.pop(h)
                    if isinstance(result, BaseException):
                        err = f"the worker failed: {type(result).__name__}: {str(result).splitlines()[0] if str(result) else ''}"
                        result = [CellOutcome(c.cell_id, False, error=err) for c in task_cells]
                    for o in result:
                        cell = by_id[o.cell_id]
                        if cell.cell_id in done:
                            continue  # a finished victim re-run only to get its weights back
                        if o.ok:
                            _store_cell(cs, cell, o)
                            done.add(cell.cell_id)
                            summary.done += 1
                            if cell.kind == "victim" and not o.metrics.get("victim_from_cache"):
                                summary.trained += 1
                            progress("done", cell=cell, outcome=o)
                        else:
                            cs.mark(cell, "failed", o.error)
                            summary.failed += 1
                            summary.failures[cell.title()] = o.error or "failed"
                            progress("failed", cell=cell, outcome=o)
                    if kind == "victim":
                        vo = result[0]
                        cfg = g.victim.config
                        if vo.ok and vo.weights is not None:
                            if cfg.cache:
                                cache = store.cache_path(cfg.victim_key())
                                if not cache.is_file():
                                    atomic_write_bytes(cache, vo.weights)
                                    if vo.history:
                                        atomic_write_json(cache.with_suffix(".history.json"), vo.history)
                            submit_defenses(g, VictimPayload(vo.weights, vo.metrics))
                        else:
                            for c in g.defenses:
                                if c.cell_id not in done:
                                    err = f"victim failed: {vo.error}"
                                    cs.mark(c, "failed", err)
                                    summary.failed += 1
                                    summary.failures[c.title()] = err
                                    progress("failed", cell=c, outcome=CellOutcome(c.cell_id, False, error=err))
                    progress("running", n=sum(len(v[2]) for v in handles.values()))
        finally:
            engine.close()
    summary.seconds = time.perf_counter() - t0
    progress("end", summary=summary)
    return summary
