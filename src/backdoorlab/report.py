"""Reports from the store: one self-contained HTML page (figures embedded as base64 PNG), plus
Markdown (figures beside it), CSV (one row per cell) and JSON.

``build_report(store, target)`` reads the store only and returns ``{relative path: bytes}``; the
CLI writes the folder atomically. ``target`` is a grid name, a run id (or unique prefix), or None
(the most recently run grid, else the newest run).

Tables:
- CA / ASR before and after each model-repairing defense (repairers, robust trainers), with the
  DER of BackdoorBench: ((max(0, ASR_before - ASR_after) - max(0, CA_before - CA_after)) + 1) / 2,
  and the published figures where the setting matches (``paper``: the seeds; ``BackdoorBench``).
- DER matrix: attacks x defenses.
- Detectors: data / model level (TPR, FPR, precision, AUROC, ...) and input level (FRR, FAR, AUROC).
Seeds are averaged (mean, and the standard deviation when there are several).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backdoorlab import metrics as M
from backdoorlab.errors import BackdoorLabError
from backdoorlab.published import PUBLISHED, Published, lookup
from backdoorlab.store import RunRecord, Store

log = logging.getLogger(__name__)

REPAIR_FAMILIES = ("repairer", "robust-trainer")
DATA_DETECTORS = ("inspector", "cleanser")
INPUT_DETECTORS = ("detector",)
DATA_DETECTOR_KEYS = ("tpr", "fpr", "precision", "auroc", "label_accuracy", "flagged", "backdoored", "target_found",
                      "pair_found", "max_anomaly", "isolation_precision")
INPUT_DETECTOR_KEYS = ("frr", "far", "auroc")


@dataclass
class Row:
    """One cell (or one seed-average of cells) as the report shows it."""

    data: str
    model: str
    attack: str
    defense: str
    family: str
    seed: Any
    status: str = "done"
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    figures: list[tuple[str, Path]] = field(default_factory=list)
    run_id: str = ""
    cell_id: str = ""
    error: str = ""
    spread: dict[str, float] = field(default_factory=dict)  # standard deviations over seeds
    n: int = 1


# ----------------------------------------------------------------------------- collecting
def _figures(rec: RunRecord) -> list[tuple[str, Path]]:
    return [(k.split(":", 1)[1], Path(rec.run_dir) / v) for k, v in sorted(rec.artifacts.items()) if k.startswith("figure:")]


def current_cell_ids(cs: Any, grid: str) -> set[str] | None:
    """The cell ids of ``grid`` as last run: its saved spec, expanded by this library (None when the
    spec is missing or no longer expands). A store keeps the cells of earlier versions of a grid (an
    edited YAML, a defense whose default changed); a report shows the current ones only."""
    from backdoorlab.grid import expand, parse_spec

    spec = cs.grid_spec(grid)
    if spec is None:
        return None
    try:
        return {c.cell_id for c in expand(parse_spec(spec, where=f"grid {grid}")).cells}
    except BackdoorLabError as exc:
        log.warning("grid %s as saved no longer expands (%s); the report shows every cell the store holds for it",
                    grid, str(exc).splitlines()[0][:200])
        return None


def _grid_rows(store: Store, grid: str) -> list[Row]:
    from backdoorlab.cellstore import CellStore

    cs = CellStore(store)
    cells = cs.cells(grid)
    ids = current_cell_ids(cs, grid)
    if ids is not None:
        stale = [c for c in cells if c.cell_id not in ids]
        if stale:
            log.info("grid %s: %d cell(s) of earlier versions of the grid left out of the report", grid, len(stale))
        cells = [c for c in cells if c.cell_id in ids]
    recs = cs.records(cells)
    rows = []
    for c in cells:
        rec = recs.get(c.cell_id)
        rows.append(Row(c.data, c.model, c.attack, c.defense, c.family, c.seed, c.status,
                        dict(rec.metrics) if rec else {}, rec.config if rec else {}, _figures(rec) if rec else [],
                        rec.run_id if rec else "", c.cell_id, c.error or ""))
    return rows


def _run_rows(rec: RunRecord) -> list[Row]:
    """A single experiment run (``backdoorlab run``): the victim and its defenses."""
    from backdoorlab.defenses import DEFENSES

    cfg = rec.config
    data = (cfg.get("data") or {}).get("name", "?")
    model = (cfg.get("model") or {}).get("name", "?")
    attack = (cfg.get("attack") or {}).get("name", "none")
    seed = cfg.get("seed", 0)
    figs = _figures(rec)
    base = {k: v for k, v in rec.metrics.items() if not k.startswith("defense.")}
    victim_cfg = {**cfg, "defenses": []}
    rows = [Row(data, model, attack, "none", "victim", seed, "done", base, victim_cfg,
                [f for f in figs if f[0] in ("samples", "training")], rec.run_id)]
    for d in cfg.get("defenses") or []:
        name = d["name"]
        prefix = f"defense.{name}."
        m = {k[len(prefix):]: v for k, v in rec.metrics.items() if k.startswith(prefix)}
        m["clean_accuracy_before"] = base.get("clean_accuracy", math.nan)
        if "attack_success_rate" in base:
            m["attack_success_rate_before"] = base["attack_success_rate"]
        fam = getattr(DEFENSES.get(name).factory, "family", "defense") if name in DEFENSES else "defense"
        rows.append(Row(data, model, attack, name, fam, seed, "done", m, {**cfg, "defenses": [d]},
                        [f for f in figs if f[0].startswith(name + "_")], rec.run_id))
    return rows


def collect(store: Store, target: str | None) -> tuple[str, str, list[Row]]:
    """(kind, name, rows) for a grid name, a run id, or the latest grid / run."""
    from backdoorlab.cellstore import CellStore

    grids = CellStore(store).grid_names()
    if target is None:
        if grids:
            return "grid", grids[0], _grid_rows(store, grids[0])
        runs = store.runs(limit=1)
        if not runs:
            raise BackdoorLabError(f"the store {store.root} holds no runs or grids yet; run `backdoorlab bench GRID.yaml` "
                                   "or `backdoorlab run` first")
        return "run", runs[0].run_id, _run_rows(runs[0])
    if target in grids:
        return "grid", target, _grid_rows(store, target)
    try:
        rec = store.get(target)
    except BackdoorLabError:
        known = ", ".join(grids[:10]) or "(none)"
        raise BackdoorLabError(f"{target!r} is neither a grid nor a run in {store.root}; grids: {known}; "
                               "`backdoorlab runs` lists the runs") from None
    return "run", rec.run_id, _run_rows(rec)


def aggregate(rows: list[Row]) -> list[Row]:
    """Average the finished cells over seeds: one row per (data, model, attack, defense)."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.status == "done":
            groups.setdefault((r.data, r.model, r.attack, r.defense), []).append(r)
    out = []
    for (d, m, a, f), rs in groups.items():
        keys = sorted({k for r in rs for k in r.metrics})
        mean, sd = {}, {}
        for k in keys:
            vals = [r.metrics[k] for r in rs if k in r.metrics and r.metrics[k] is not None and math.isfinite(r.metrics[k])]
            if vals:
                mean[k] = statistics.fmean(vals)
                if len(vals) > 1:
                    sd[k] = statistics.stdev(vals)
        seeds = sorted({r.seed for r in rs})
        out.append(Row(d, m, a, f, rs[0].family, ",".join(map(str, seeds)), "done", mean, rs[0].config,
                       [fig for r in rs for fig in r.figures], ",".join(r.run_id for r in rs), n=len(rs), spread=sd))
    return out


# ----------------------------------------------------------------------------- tables
def _fmt(v: Any, sd: float | None = None) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, float) and not math.isfinite(v):
        return ""
    s = f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return s + (f" ± {sd:.3f}" if sd is not None else "")


def _pub(config: dict[str, Any], column: str, keys: tuple[str, ...], used: dict[str, Published]) -> str:
    p, exact = lookup(config, column)
    if p is None:
        return ""
    vals = [p.values[k] for k in keys if k in p.values]
    if not vals:
        return ""
    mark = "" if exact else " †"
    ref = f"[{len(used) + 1}]" if p.source + p.setting not in used else f"[{list(used).index(p.source + p.setting) + 1}]"
    used.setdefault(p.source + p.setting, p)
    return " / ".join(_fmt(v) for v in vals) + mark + " " + ref


@dataclass
class Table:
    id: str
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


def _method_keys(rows: list[Row]) -> list[str]:
    """The defenses' own report columns (their :attr:`Defense.report_keys`) that some row holds, in order."""
    from backdoorlab.defenses import DEFENSES

    keys: list[str] = []
    for name in sorted({r.defense for r in rows}):
        factory = DEFENSES.get(name).factory if name in DEFENSES else None
        keys += [k for k in getattr(factory, "report_keys", ()) if k not in keys and any(k in r.metrics for r in rows)]
    return keys


def tables(rows: list[Row], used: dict[str, Published]) -> list[Table]:
    agg = aggregate(rows)
    victims = {(r.data, r.model, r.attack): r for r in agg if r.defense == "none"}
    out: list[Table] = []
    # 1. CA / ASR before / after
    t_rows = []
    own = _method_keys([r for r in agg if r.family in REPAIR_FAMILIES])
    for key, v in sorted(victims.items()):
        t_rows.append([*key, "none (victim)", str(v.n), _fmt(v.metrics.get("clean_accuracy"), v.spread.get("clean_accuracy")),
                       _fmt(v.metrics.get("attack_success_rate"), v.spread.get("attack_success_rate")), "", "", "",
                       _pub(v.config, "paper", ("clean_accuracy", "attack_success_rate"), used),
                       _pub(v.config, "backdoorbench", ("clean_accuracy", "attack_success_rate"), used), *([""] * len(own))])
        for r in sorted((r for r in agg if (r.data, r.model, r.attack) == key and r.family in REPAIR_FAMILIES),
                        key=lambda r: r.defense):
            m = r.metrics
            ca_b, asr_b = m.get("clean_accuracy_before"), m.get("attack_success_rate_before")
            ca_a, asr_a = m.get("clean_accuracy"), m.get("attack_success_rate")
            der = m.get("der")
            if der is None and None not in (ca_b, asr_b, ca_a, asr_a):
                der = M.defense_effectiveness_rating(ca_b, ca_a, asr_b, asr_a)
            t_rows.append([*key, r.defense, str(r.n), _fmt(ca_b), _fmt(asr_b), _fmt(ca_a, r.spread.get("clean_accuracy")),
                           _fmt(asr_a, r.spread.get("attack_success_rate")), _fmt(der, r.spread.get("der")),
                           _pub(r.config, "paper", ("clean_accuracy", "attack_success_rate"), used),
                           _pub(r.config, "backdoorbench", ("clean_accuracy", "attack_success_rate"), used),
                           *(_fmt(m.get(k), r.spread.get(k)) for k in own)])
    out.append(Table("ca-asr", "Clean accuracy (CA) and attack success rate (ASR), before and after the defense",
                     ["data", "model", "attack", "defense", "seeds", "CA before", "ASR before", "CA after", "ASR after",
                      "DER", "paper CA / ASR", "BackdoorBench CA / ASR", *own], t_rows,
                     "DER = ((max(0, ASR before - ASR after) - max(0, CA before - CA after)) + 1) / 2 (BackdoorBench); "
                     "1 = backdoor removed at no cost, 0.5 = no change. † = published for another setting (see sources)."))
    # 2. DER matrix
    rep = [r for r in agg if r.family in REPAIR_FAMILIES]
    defenses = sorted({r.defense for r in rep})
    if defenses:
        mrows = []
        for key in sorted(victims) + sorted({(r.data, r.model, r.attack) for r in rep} - set(victims)):
            cells = {r.defense: r for r in rep if (r.data, r.model, r.attack) == key}
            if cells:
                mrows.append([" / ".join(key)] + [_fmt(cells[d].metrics.get("der")) if d in cells else "" for d in defenses])
        out.append(Table("der-matrix", "DER, attacks x defenses", ["data / model / attack", *defenses], mrows))
    # 3. detectors
    det = [r for r in agg if r.family in DATA_DETECTORS]
    if det:
        keys = [k for k in DATA_DETECTOR_KEYS if any(k in r.metrics for r in det)]
        own = [k for k in _method_keys(det) if k not in keys]
        out.append(Table("detectors-data", "Model and data-set detectors (inspectors, cleansers), scored with the ground truth",
                         ["data", "model", "attack", "defense", "seeds", *keys, "paper", *own],
                         [[r.data, r.model, r.attack, r.defense, str(r.n), *(_fmt(r.metrics.get(k), r.spread.get(k)) for k in keys),
                           _pub(r.config, "paper", ("tpr", "fpr", "pair_found"), used),
                           *(_fmt(r.metrics.get(k), r.spread.get(k)) for k in own)] for r in sorted(det, key=lambda r: (r.data, r.model, r.attack, r.defense))],
                         "TPR / FPR / precision: flagged poisoned training samples; backdoored, target_found, pair_found: 1 = yes."))
    inp = [r for r in agg if r.family in INPUT_DETECTORS]
    if inp:
        own = [k for k in _method_keys(inp) if k not in INPUT_DETECTOR_KEYS]
        out.append(Table("detectors-input", "Input detectors (run time): FRR on clean test inputs, FAR on triggered ones",
                         ["data", "model", "attack", "defense", "seeds", "FRR", "FAR", "AUROC", "paper FRR / FAR", *own],
                         [[r.data, r.model, r.attack, r.defense, str(r.n), *(_fmt(r.metrics.get(k), r.spread.get(k)) for k in INPUT_DETECTOR_KEYS),
                           _pub(r.config, "paper", ("frr", "far"), used), *(_fmt(r.metrics.get(k), r.spread.get(k)) for k in own)]
                          for r in sorted(inp, key=lambda r: (r.data, r.model, r.attack, r.defense))]))
    from backdoorlab.population import tables as population_tables

    out += [Table(*t) for t in population_tables(rows)]  # ROC / calibrated verdicts when the grid is a population
    bad = [r for r in rows if r.status != "done"]
    if bad:
        out.append(Table("unfinished", "Cells not finished (rerun `backdoorlab bench` to resume)",
                         ["data", "model", "attack", "defense", "seed", "status", "error"],
                         [[r.data, r.model, r.attack, r.defense, str(r.seed), r.status, r.error] for r in bad]))
    return out


# ----------------------------------------------------------------------------- rendering
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}
td:nth-child(-n+4){text-align:left}.note{font-size:12px;color:#555;max-width:1000px}
figure{display:inline-block;margin:6px;vertical-align:top}figcaption{font-size:11px;color:#444;max-width:420px}
img{max-width:420px;border:1px solid #ddd}.sum img{max-width:1000px}
"""


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in t.rows)
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return f'<h2>{html.escape(t.title)}</h2>\n<table id="{t.id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}\n'


def _md_table(t: Table) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    lines = [f"## {t.title}", "", "| " + " | ".join(map(esc, t.columns)) + " |", "|" + "---|" * len(t.columns)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in t.rows]
    if t.note:
        lines += ["", t.note]
    return "\n".join(lines) + "\n"


def _sources(used: dict[str, Published]) -> list[str]:
    return [f"[{i}] {p.source}: {p.setting}" for i, p in enumerate(used.values(), 1)]


def build_report(store: Store, target: str | None = None) -> dict[str, bytes]:
    kind, name, rows = collect(store, target)
    used: dict[str, Published] = {}
    tabs = tables(rows, used)
    title = f"backdoorlab report: {kind} {name}"
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    n_done = sum(r.status == "done" for r in rows)
    files: dict[str, bytes] = {}
    from backdoorlab.plots_defenses import repair_summary

    summary_png = repair_summary([r for r in aggregate(rows) if r.family in REPAIR_FAMILIES and "attack_success_rate" in r.metrics])
    # HTML
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1><p class='note'>{n_done} of {len(rows)} cells finished; generated {generated} "
             f"from {html.escape(str(store.db_path))}</p>"]
    if summary_png is not None:
        parts.append("<h2>CA and ASR before / after</h2><div class='sum'><img id='summary-figure' alt='CA and ASR before and "
                     f"after each defense' src='data:image/png;base64,{base64.b64encode(summary_png).decode()}'></div>")
    parts += [_html_table(t) for t in tabs]
    from backdoorlab.population import roc_figure, summarise

    roc_png = roc_figure(summarise(rows))
    if roc_png is not None:
        files["figures/population_roc.png"] = roc_png
        parts.append("<h2>Population ROC</h2><img id='population-roc' alt='ROC of the model-level detectors over the "
                     f"population' src='data:image/png;base64,{base64.b64encode(roc_png).decode()}'>")
    if used:
        parts.append("<h2>Sources of the published figures</h2><ol class='note'>" +
                     "".join(f"<li>{html.escape(s.split('] ', 1)[1])}</li>" for s in _sources(used)) + "</ol>")
    md = [f"# {title}", "", f"{n_done} of {len(rows)} cells finished; generated {generated}.", ""]
    if summary_png is not None:
        files["figures/summary.png"] = summary_png
        md += ["![CA and ASR before / after](figures/summary.png)", ""]
    md += [_md_table(t) for t in tabs] + (["![population ROC](figures/population_roc.png)", ""] if roc_png else [])
    if used:
        md += ["## Sources of the published figures", ""] + [f"- {s}" for s in _sources(used)] + [""]
    fig_html, fig_md = [], []
    n_fig = 0
    for r in sorted((r for r in rows if r.status == "done"), key=lambda r: (r.data, r.model, r.attack, str(r.seed), r.defense)):
        for fname, path in r.figures:
            if not path.is_file():
                continue
            png = path.read_bytes()
            n_fig += 1
            caption = f"{r.data} / {r.model} / {r.attack} / {r.defense} / seed {r.seed}: {fname}"
            rel = f"figures/{n_fig:03d}_{r.attack}_{r.defense}_{fname}.png".replace(" ", "_")
            files[rel] = png
            fig_html.append(f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,"
                            f"{base64.b64encode(png).decode()}'><figcaption>{html.escape(caption)}</figcaption></figure>")
            fig_md.append(f"![{caption}]({rel})")
    if fig_html:
        parts.append(f"<h2 id='figures'>Figures ({n_fig})</h2>" + "".join(fig_html))
        md += [f"## Figures ({n_fig})", ""] + fig_md + [""]
    parts.append("</body></html>")
    files["report.html"] = "\n".join(parts).encode()
    files["report.md"] = "\n".join(md).encode()
    # CSV: one row per cell
    keys = sorted({k for r in rows for k in r.metrics})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["grid" if kind == "grid" else "run", "cell_id", "run_id", "data", "model", "attack", "defense", "family",
                "seed", "status", *keys])
    for r in rows:
        w.writerow([name, r.cell_id, r.run_id, r.data, r.model, r.attack, r.defense, r.family, r.seed, r.status,
                    *(("" if r.metrics.get(k) is None else repr(float(r.metrics[k]))) for k in keys)])
    files["cells.csv"] = buf.getvalue().encode()
    # JSON
    def clean(v: Any) -> Any:
        return None if isinstance(v, float) and not math.isfinite(v) else v

    doc = {"kind": kind, "name": name, "generated": generated, "cells_total": len(rows), "cells_done": n_done,
           "cells": [{"cell_id": r.cell_id, "run_id": r.run_id, "data": r.data, "model": r.model, "attack": r.attack,
                      "defense": r.defense, "family": r.family, "seed": r.seed, "status": r.status, "error": r.error or None,
                      "metrics": {k: clean(v) for k, v in r.metrics.items()}} for r in rows],
           "tables": {t.id: {"title": t.title, "columns": t.columns, "rows": t.rows} for t in tabs},
           "sources": _sources(used)}
    files["report.json"] = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
    return files


__all__ = ["build_report", "collect", "aggregate", "tables", "PUBLISHED"]
