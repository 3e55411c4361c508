"""The ``backdoorlab`` command line (typer): it parses options, calls :mod:`backdoorlab.api` and
renders tables or JSON.

Results go to stdout (a table, or one JSON object with ``--json``); logs and progress go to
stderr. Bad input prints one ``error: ...`` line and exits with code 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from backdoorlab.cli import cleanse, data, defend, experiments, grid, inspection, serve
from backdoorlab.cli.common import OneLineErrors, err

app = typer.Typer(cls=OneLineErrors, add_completion=False, no_args_is_help=True,
                  help="Attack and defend image classifiers against backdoor data poisoning.")

for _name, _fn in (
    ("run", experiments.run), ("list", experiments.list_), ("runs", experiments.runs), ("show", experiments.show),
    ("audit", inspection.audit), ("calibrate", inspection.calibrate), ("cleanse", cleanse.cleanse), ("repair", defend.repair), ("guard", defend.guard), ("biasmaps", inspection.biasmaps),
    ("train-robust", defend.train_robust), ("data", data.data), ("bench", grid.bench), ("population", grid.population), ("report", grid.report),
    ("serve", serve.serve),
):  # registered in this order: the order of `backdoorlab --help`
    app.command(_name)(_fn)


def main() -> None:
    """Entry point of the ``backdoorlab`` script."""
    from backdoorlab.runtime import tune_allocator

    tune_allocator()
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; nothing half-written was kept")
        sys.exit(130)


__all__ = ["app", "main"]
