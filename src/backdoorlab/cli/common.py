"""What every command shares: the consoles, error handling (one ``error:`` line, exit code 2),
JSON printing, number formatting, logging, the training progress bar and ``--param`` parsing."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, List

import typer
from rich.console import Console
from typer.core import TyperGroup

from backdoorlab.errors import BackdoorLabError

# piped or redirected output has no terminal width; rich would then squeeze tables into 80 columns
# and cut every cell to a few characters, so give it room (a terminal keeps its own width)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 240)
err = Console(stderr=True)

StoreOpt = typer.Option(None, "--store", help="results folder (default ./backdoorlab-runs or $BACKDOORLAB_HOME)")
JsonOpt = typer.Option(False, "--json", help="print one JSON object on stdout")


def print_error(message: str) -> None:
    """One line ``error: <message>`` on stderr: newlines collapsed, the text escaped for rich's
    markup (a message may hold ``[x]`` brackets, e.g. a file or key name)."""
    from rich.markup import escape

    from backdoorlab.validate import one_line

    err.print(f"[bold red]error:[/bold red] {escape(one_line(str(message), 2000))}", markup=True, highlight=False,
              soft_wrap=True)


def handles_errors(fn):
    """Turn :class:`BackdoorLabError` into one line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BackdoorLabError as exc:
            print_error(str(exc))
            raise typer.Exit(2) from None

    return wrapper


class OneLineErrors(TyperGroup):
    """The command group: a usage error (a missing option, a value of the wrong type, an unknown
    command) is one ``error:`` line and exit code 2, like every other bad input (not click's
    usage box)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[override]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as exc:  # click's classes (typer may vendor its own click): told apart by name
            kinds = {c.__name__ for c in type(exc).__mro__}
            if "NoArgsIsHelpError" in kinds or "UsageError" not in kinds and "ClickException" not in kinds:
                if "NoArgsIsHelpError" in kinds or "Abort" in kinds:  # the help / "Aborted!" as typer shows them
                    return super().main(args, prog_name, complete_var, standalone_mode=True, **extra)
                raise
            ctx = getattr(exc, "ctx", None)
            if "UsageError" in kinds:
                where = ctx.command_path if ctx is not None else "backdoorlab"
                print_error(f"{exc.format_message()} (see `{where} --help`)")
                sys.exit(2)
            print_error(exc.format_message())
            sys.exit(getattr(exc, "exit_code", 1))
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)], force=True)


def print_json(obj: dict) -> None:
    from backdoorlab.api import json_ready

    sys.stdout.write(json.dumps(json_ready(obj), sort_keys=True) + "\n")
    sys.stdout.flush()


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def method_params(items: List[str], option: str = "--param", example: str = "tolerance=0.01") -> dict:
    """``--param NAME=VALUE`` items (or another ``option``'s) as a dict (values parsed like ``--set``)."""
    from backdoorlab.config import parse_override

    params: dict = {}
    for item in items:
        parts, value = parse_override(item)
        if len(parts) != 1:
            raise BackdoorLabError(f"{option} {item!r}: expected NAME=VALUE, e.g. {option} {example}")
        params[parts[0]] = value
    return params


def write_figures(report: Any, folder: Path | None, key: str) -> dict[str, str]:
    """Write ``report``'s figures into ``folder`` (when given); ``{key: path}`` for a single figure,
    else ``{stem: path}``."""
    if folder is None:
        return {}
    written = report.write_figures(folder)
    return {key: next(iter(written.values()))} if len(written) == 1 else written


def print_written(written: dict[str, str]) -> None:
    for kind, v in written.items():
        out.print(f"wrote {kind}: {v}")


class Progress:
    """Training progress bar on stderr (silent when stderr is not a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and err.is_terminal
        self.bar = None
        self.task = None

    def __call__(self, event: str, **info: Any) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        if event == "train_start":
            self.bar = Bar(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                           TimeRemainingColumn(), console=err, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=info["total_steps"])
        elif event == "step" and self.bar is not None:
            self.bar.update(self.task, completed=info["step"], description=f"epoch {info['epoch'] + 1}")
        elif event == "epoch_end" and self.bar is not None:
            s = info["stats"]
            self.bar.console.log(f"epoch {s.epoch}: loss {s.loss:.4f}, train acc {s.train_accuracy:.4f}, "
                                 f"{s.images_per_second:.0f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
