"""``backdoorlab bench`` and ``backdoorlab report`` (registered on the typer app of :mod:`backdoorlab.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from backdoorlab.cli import JsonOpt, StoreOpt, _fmt, _print_json, _setup_logging, _write_dir_atomically, app, err, handles_errors, out
from backdoorlab.errors import BackdoorLabError


class GridProgress:
    """Cells done / running / failed and an ETA on stderr: a rich bar on a terminal, else one line per cell."""

    def __init__(self) -> None:
        self.live = err.is_terminal
        self.bar = None
        self.task = None
        self.total = self.done = self.failed = self.running = 0

    def _text(self) -> str:
        return f"done {self.done}  running {self.running}  failed {self.failed}"

    def __call__(self, event: str, **info: Any) -> None:
        if event == "start":
            self.total = info["total"]
            if info["skipped"]:
                err.print(f"grid {info['grid']}: {info['skipped']} cell(s) already done, skipped (resume)")
            if self.live:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

                self.bar = Progress(TextColumn(f"[bold]{info['grid']}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.description}"), TimeElapsedColumn(), TextColumn("ETA"),
                                    TimeRemainingColumn(), console=err, transient=False)
                self.bar.start()
                self.task = self.bar.add_task(self._text(), total=max(self.total, 1))
            else:
                err.print(f"grid {info['grid']}: {self.total} cell(s) to run")
            return
        if event == "running":
            self.running = info["n"]
        elif event in ("done", "failed"):
            cell, o = info["cell"], info["outcome"]
            if event == "done":
                self.done += 1
            else:
                self.failed += 1
            n = self.done + self.failed
            msg = f"[{n}/{self.total}] {event} {cell.title()} ({o.seconds:.1f} s)"
            if event == "failed":
                msg += f": {o.error}"
            if self.bar is not None:
                self.bar.console.log(msg, markup=False, highlight=False)
            else:
                err.print(msg, markup=False, highlight=False)
        elif event == "end":
            self.close()
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done + self.failed, description=self._text())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@app.command()
@handles_errors
def bench(
    grid: Path = typer.Argument(..., help="grid YAML (see configs/grids/)"),
    engine: str = typer.Option("local", "--engine", help="local (this machine) or ray"),
    workers: Optional[int] = typer.Option(None, "--workers", help="parallel workers: processes (local) or Ray CPUs (default: 1 local; all CPUs on Ray)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (auto = the running cluster); default: start a local Ray"),
    set_: List[str] = typer.Option([], "--set", help="override a grid key, e.g. --set base.train.epochs=2 (repeatable)"),
    wait: float = typer.Option(0.0, "--wait", min=0, help="seconds to wait for another bench writing the same store (default: refuse at once)"),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log each stage to stderr"),
) -> None:
    """Run a grid (data sets x models x attacks x defenses x seeds): each victim trained once, every
    defense run against it, every cell stored; an interrupted grid resumes where it stopped."""
    from backdoorlab.bench import run_grid
    from backdoorlab.engines import make_engine
    from backdoorlab.grid import load_grid
    from backdoorlab.store import Store

    _setup_logging(verbose)
    g = load_grid(grid, set_)  # every name and parameter checked before anything runs
    st = Store(store)
    eng = make_engine(engine, workers, address)
    progress = GridProgress()
    try:
        summary = run_grid(g, st, eng, progress, lock_wait=wait)
    finally:
        progress.close()
        eng.close()
    from backdoorlab.cellstore import CellStore

    rows = CellStore(st).cells(g.name)
    recs = CellStore(st).records(rows)
    keys = ("clean_accuracy", "attack_success_rate", "der", "tpr", "fpr", "frr", "far", "auroc")
    results = [{"cell_id": r.cell_id, "data": r.data, "model": r.model, "attack": r.attack, "defense": r.defense,
                "family": r.family, "seed": r.seed, "status": r.status, "run_id": r.run_id, "error": r.error,
                "metrics": recs[r.cell_id].metrics if r.cell_id in recs else {}} for r in rows
               if r.cell_id in {c.cell_id for c in g.cells}]
    result = {**summary.as_dict(), "store": str(st.root), "results": results}
    if as_json:
        _print_json(result)
    else:
        t = Table(title=f"grid {g.name}: {summary.done} run, {summary.skipped} skipped, {summary.failed} failed "
                        f"({summary.seconds:.1f} s, {eng.describe()})")
        for col in ("data", "model", "attack", "defense", "seed", "status", *keys):
            t.add_column(col.replace("_", " ") if col not in ("clean_accuracy", "attack_success_rate") else
                         {"clean_accuracy": "CA", "attack_success_rate": "ASR"}[col], justify="right")
        for r in results:
            m = r["metrics"]
            t.add_row(r["data"], r["model"], r["attack"], r["defense"], str(r["seed"]), r["status"],
                      *(_fmt(m[k]) if k in m else "" for k in keys))
        out.print(t)
        out.print(f"store: {st.root}; `backdoorlab report {g.name}` writes the report")
    if summary.failed:
        err.print(f"[bold red]error:[/bold red] {summary.failed} cell(s) failed; fix the cause and rerun the same command "
                  "to retry them (finished cells are kept)", markup=True, highlight=False)
        raise typer.Exit(1)


@app.command()
@handles_errors
def report(
    target: Optional[str] = typer.Argument(None, help="a grid name or a run id (default: the latest grid, else the latest run)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="report folder (default ./report-<name>)"),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write an HTML page (self-contained), Markdown, CSV and JSON: CA/ASR before and after each
    defense with DER, detector tables, published figures beside ours, and every figure."""
    from backdoorlab.report import build_report, collect
    from backdoorlab.store import Store

    st = Store(store)
    if not st.db_path.exists():
        raise BackdoorLabError(f"no results store at {st.root}; run `backdoorlab bench` first or pass --store")
    files = build_report(st, target)
    import json as _json

    doc = _json.loads(files["report.json"])
    folder = out_dir or Path(f"report-{doc['name'].replace('/', '_')}")
    _write_dir_atomically(folder, files)
    result = {"kind": doc["kind"], "name": doc["name"], "out": str(folder), "html": str(folder / "report.html"),
              "markdown": str(folder / "report.md"), "csv": str(folder / "cells.csv"), "json": str(folder / "report.json"),
              "cells": doc["cells_total"], "cells_done": doc["cells_done"],
              "figures": sum(1 for k in files if k.startswith("figures/"))}
    if as_json:
        _print_json(result)
        return
    out.print(f"report of {doc['kind']} {doc['name']} ({doc['cells_done']}/{doc['cells_total']} cells): {folder / 'report.html'}")
