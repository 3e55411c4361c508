"""Experiments and grids: :func:`run` (one experiment, stored), :func:`bench` (a grid of them,
resumable) and :func:`report` (the report of a stored grid or run)."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

from backdoorlab.api._common import Report, to_json
from backdoorlab.errors import BackdoorLabError, format_validation_error


def _store(store: Any):
    from backdoorlab.store import Store

    return store if isinstance(store, Store) else Store(store)


def _config(config: Any, overrides: Iterable[str]):
    """An ExperimentConfig from a YAML path (None: the defaults), a dict or a config, with overrides."""
    from pydantic import ValidationError

    from backdoorlab.config import ExperimentConfig, apply_overrides, load_config

    overrides = list(overrides)
    if isinstance(config, ExperimentConfig):
        if not overrides:
            return config
        config = json.loads(config.model_dump_json())
    if isinstance(config, dict):
        doc = apply_overrides(copy.deepcopy(config), overrides)
        try:
            cfg = ExperimentConfig.model_validate(doc)
        except ValidationError as exc:
            raise BackdoorLabError(format_validation_error(exc)) from exc
        cfg.check_components()
        return cfg
    return load_config(config, overrides)


def run(config: Any = None, *, store: Any = None, overrides: Iterable[str] = (), callbacks: tuple = ()):
    """Run one experiment (a YAML path, a dict, an ExperimentConfig; None: BadNets on mnist5k) end to
    end: poison, train the victim (or reuse it from the store's cache), evaluate, run its defenses;
    store it. ``overrides`` like ``"attack.target=1"``. Returns the stored :class:`RunRecord`."""
    from backdoorlab.experiment import run as run_experiment

    cfg = _config(config, overrides)
    return run_experiment(cfg, _store(store), callbacks=tuple(callbacks))


# ----------------------------------------------------------------------------- grids
@dataclass(eq=False)
class BenchReport(Report):
    """A grid run: the counts (``summary``), one row per cell with its metrics (``results``). Its
    report folder is the grid's report (HTML, Markdown, CSV, JSON) plus ``bench.json``."""

    kind: ClassVar[str] = "bench"
    grid: Any
    store: Any
    summary: Any
    results: list[dict[str, Any]]
    engine: str = ""

    @property
    def failed(self) -> int:
        return self.summary.failed

    def _dict(self) -> dict[str, Any]:
        return {**self.summary.as_dict(), "store": str(self.store.root), "results": self.results}

    def files(self) -> dict[str, bytes]:
        from backdoorlab.report import build_report

        return {**build_report(self.store, self.grid.name), "bench.json": (to_json(self._dict(), indent=2) + "\n").encode()}

    def default_folder(self) -> Path:
        return Path(f"report-{self.grid.name.replace('/', '_')}")


def _grid(grid: Any, overrides: list[str]):
    from backdoorlab.grid import Grid, expand, load_grid, parse_spec

    if isinstance(grid, Grid):
        if overrides:
            raise BackdoorLabError("overrides apply to a grid file or dict, not to an expanded Grid")
        return grid
    if isinstance(grid, dict):
        from backdoorlab.config import apply_overrides

        return expand(parse_spec(apply_overrides(copy.deepcopy(grid), overrides)))
    return load_grid(grid, overrides)


def bench(grid: Any, *, store: Any = None, engine: str = "local", workers: int | None = None, address: str | None = None,
          overrides: Iterable[str] = (), wait: float = 0.0, progress: Callable[..., None] | None = None,
          population: bool = False) -> BenchReport:
    """Run a grid (a YAML path, a dict or a Grid: data sets x models x attacks x defenses x seeds)
    on ``engine`` (local processes, or ray): each victim trained once, every defense run against it,
    every cell stored; cells already done in ``store`` are skipped (resume). ``wait``: seconds to
    wait for another bench writing the same store. Failed cells are counted, not raised.
    ``population``: the grid is a model population (:mod:`backdoorlab.population`): it must hold clean
    and backdoored models, two or more seeds and an inspector."""
    from backdoorlab.bench import run_grid
    from backdoorlab.cellstore import CellStore
    from backdoorlab.engines import make_engine

    g = _grid(grid, list(overrides))  # every name and parameter checked before anything runs
    if population:  # clean and backdoored models, two seed halves, an inspector: or one clear error
        from backdoorlab.population import check_population

        check_population(g.spec)
    st = _store(store)
    eng = make_engine(engine, workers, address)
    described = eng.describe()
    try:
        summary = run_grid(g, st, eng, progress, lock_wait=wait)
    finally:
        if progress is not None and hasattr(progress, "close"):
            progress.close()
        eng.close()
    cs = CellStore(st)
    rows = cs.cells(g.name)
    recs = cs.records(rows)
    ids = {c.cell_id for c in g.cells}
    results = [{"cell_id": r.cell_id, "data": r.data, "model": r.model, "attack": r.attack, "defense": r.defense,
                "family": r.family, "seed": r.seed, "status": r.status, "run_id": r.run_id, "error": r.error,
                "metrics": recs[r.cell_id].metrics if r.cell_id in recs else {}} for r in rows if r.cell_id in ids]
    return BenchReport(g, st, summary, results, described)


@dataclass(eq=False)
class StoreReport(Report):
    """The report of a stored grid or run: ``contents`` (report.html self-contained, report.md,
    cells.csv, report.json, figures/) and ``doc`` (report.json parsed)."""

    kind: ClassVar[str] = "report"
    contents: dict[str, bytes] = field(repr=False)
    doc: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return self.doc["name"]

    def _dict(self) -> dict[str, Any]:
        d = {"kind": self.doc["kind"], "name": self.name, "cells": self.doc["cells_total"],
             "cells_done": self.doc["cells_done"], "figures": sum(1 for k in self.contents if k.startswith("figures/"))}
        if self.report_dir is not None:
            f = self.report_dir
            d.update({"out": str(f), "html": str(f / "report.html"), "markdown": str(f / "report.md"),
                      "csv": str(f / "cells.csv"), "json": str(f / "report.json")})
        return d

    def files(self) -> dict[str, bytes]:
        return dict(self.contents)

    def default_folder(self) -> Path:
        return Path(f"report-{self.name.replace('/', '_')}")


def report(target: str | None = None, *, store: Any = None) -> StoreReport:
    """The report of a grid (by name) or a run (by id) in ``store``; default: the latest grid, else
    the latest run. ``.write(folder)`` writes it (default ./report-<name>)."""
    from backdoorlab.report import build_report

    st = _store(store)
    if not st.db_path.exists():
        raise BackdoorLabError(f"no results store at {st.root}; run `backdoorlab bench` first or pass --store")
    files = build_report(st, target)
    return StoreReport(files, json.loads(files["report.json"]))
