"""``backdoorlab bench`` (run a grid) and ``backdoorlab report`` (write a grid's or a run's report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table

from backdoorlab.cli.common import JsonOpt, StoreOpt, err, fmt, handles_errors, out, print_json, setup_logging


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


_KEYS = ("clean_accuracy", "attack_success_rate", "der", "tpr", "fpr", "frr", "far", "auroc")
_SHORT = {"clean_accuracy": "CA", "attack_success_rate": "ASR"}


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
    from backdoorlab import api

    setup_logging(verbose)
    res = api.bench(grid, store=store, engine=engine, workers=workers, address=address, overrides=set_, wait=wait,
                    progress=GridProgress())
    s = res.summary
    if as_json:
        print_json(res.to_dict())
    else:
        t = Table(title=f"grid {res.grid.name}: {s.done} run, {s.skipped} skipped, {s.failed} failed "
                        f"({s.seconds:.1f} s, {res.engine})")
        for col in ("data", "model", "attack", "defense", "seed", "status", *_KEYS):
            t.add_column(_SHORT.get(col, col.replace("_", " ")), justify="right")
        for r in res.results:
            m = r["metrics"]
            t.add_row(r["data"], r["model"], r["attack"], r["defense"], str(r["seed"]), r["status"],
                      *(fmt(m[k]) if k in m else "" for k in _KEYS))
        out.print(t)
        out.print(f"store: {res.store.root}; `backdoorlab report {res.grid.name}` writes the report")
    if s.failed:
        err.print(f"[bold red]error:[/bold red] {s.failed} cell(s) failed; fix the cause and rerun the same command "
                  "to retry them (finished cells are kept)", markup=True, highlight=False)
        raise typer.Exit(1)


@handles_errors
def report(
    target: Optional[str] = typer.Argument(None, help="a grid name or a run id (default: the latest grid, else the latest run)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="report folder (default ./report-<name>)"),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Write an HTML page (self-contained), Markdown, CSV and JSON: CA/ASR before and after each
    defense with DER, detector tables, published figures beside ours, and every figure."""
    from backdoorlab import api

    rep = api.report(target, store=store)
    folder = rep.write(out_dir)
    if as_json:
        print_json(rep.to_dict())
        return
    d = rep.doc
    out.print(f"report of {d['kind']} {d['name']} ({d['cells_done']}/{d['cells_total']} cells): {folder / 'report.html'}")


@handles_errors
def population(
    grid: Path = typer.Argument(..., help="population YAML (a grid with clean and backdoored models; see configs/populations/)"),
    engine: str = typer.Option("local", "--engine", help="local (this machine) or ray"),
    workers: Optional[int] = typer.Option(None, "--workers", help="parallel workers (processes, or Ray CPUs)"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (auto = the running cluster)"),
    set_: List[str] = typer.Option([], "--set", help="override a grid key (repeatable)"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="report folder (default ./report-<name>)"),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log each stage to stderr"),
) -> None:
    """Measure model-level detectors over a population of models: train every model once (cached),
    run the inspectors, calibrate each inspector's threshold on the first half of the seeds and report
    ROC / AUROC, false alarms and detections on the other half (HTML report with the ROC figure)."""
    from backdoorlab import api
    from backdoorlab.population import tables

    setup_logging(verbose)
    res = api.bench(grid, store=store, engine=engine, workers=workers, address=address, overrides=set_,
                    progress=GridProgress(), population=True)
    rep = api.report(res.grid.name, store=res.store)
    folder = rep.write(out_dir)
    from backdoorlab.report import collect

    tabs = tables(collect(res.store, res.grid.name)[2])
    if as_json:
        print_json({**res.to_dict(), "report_dir": str(folder),
                    "population": [{"id": t[0], "columns": t[2], "rows": t[3]} for t in tabs]})
    else:
        for tid, title, cols, rows, note in tabs:
            t = Table(title=title)
            for c in cols:
                t.add_column(c, justify="right")
            for r in rows:
                t.add_row(*r)
            out.print(t)
        out.print(f"report: {folder / 'report.html'}")
    if res.summary.failed:
        err.print(f"[bold red]error:[/bold red] {res.summary.failed} cell(s) failed; rerun the same command to retry them",
                  markup=True, highlight=False)
        raise typer.Exit(1)
