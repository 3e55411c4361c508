"""``backdoorlab run``, ``list``, ``runs`` and ``show``: single experiments and the stored runs."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from backdoorlab.cli.common import JsonOpt, Progress, StoreOpt, fmt, handles_errors, out, print_json, setup_logging


@handles_errors
def run(
    config: Optional[Path] = typer.Argument(None, help="experiment YAML (default: BadNets on the embedded mnist5k)"),
    set_: List[str] = typer.Option([], "--set", help="override a config key, e.g. --set attack.target=1 (repeatable)"),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log each stage to stderr"),
) -> None:
    """Poison a data set, train a victim, report clean accuracy (CA) and attack success rate (ASR)."""
    from backdoorlab import api

    setup_logging(verbose)
    progress = Progress(enabled=True)
    try:
        rec = api.run(config, store=store, overrides=set_, callbacks=(progress,))
    finally:
        progress.close()
    m = rec.metrics
    result = {"run_id": rec.run_id, "name": rec.name, "clean_accuracy": m.get("clean_accuracy"),
              "attack_success_rate": m.get("attack_success_rate"), "robust_accuracy": m.get("robust_accuracy"),
              "poison_count": m.get("poison_count"), "seconds": round(rec.seconds, 3),
              "victim_from_cache": bool(m.get("victim_from_cache")), "run_dir": rec.run_dir}
    if as_json:
        print_json(result)
        return
    cfg = rec.config
    attack = cfg.get("attack")
    t = Table(title=f"run {rec.run_id} ({cfg['data']['name']}, {cfg['model']['name']}, "
                    f"{attack['name'] + ' ' + attack['mode'] if attack else 'no attack'})")
    for col in ("CA", "ASR", "RA", "poisoned", "seconds"):
        t.add_column(col, justify="right")
    t.add_row(*(fmt(v) if v is not None else "-" for v in (
        result["clean_accuracy"], result["attack_success_rate"], result["robust_accuracy"],
        int(result["poison_count"]) if result["poison_count"] is not None else None, result["seconds"])))
    out.print(t)
    out.print(f"run folder: {rec.run_dir}" + ("  (victim reused from cache)" if result["victim_from_cache"] else ""))


@handles_errors
def list_(as_json: bool = JsonOpt) -> None:
    """List the registered data sets, models and attacks."""
    from backdoorlab.attacks import ATTACKS, DATA_KINDS, attack_defaults, data_kind
    from backdoorlab.attacks.base import declared_datasets
    from backdoorlab.data import DATASETS
    from backdoorlab.models import MODELS

    regs = {"datasets": DATASETS, "models": MODELS, "attacks": ATTACKS}
    try:
        from backdoorlab.defenses import DEFENSES

        regs["defenses"] = DEFENSES
    except ImportError:
        pass

    def defaults(name: str) -> dict:
        """An attack's own defaults per data-set kind, and for the data sets it refines them for (keys
        the user sets win)."""
        out = {kind: attack_defaults(name, kind) for kind in DATA_KINDS}
        out.update({ds: attack_defaults(name, data_kind(ds), ds) for ds in declared_datasets(name)})
        return out

    if as_json:
        doc = {k: {e.name: {"description": e.description, "parameters": [p for p in r.parameters(e.name)
                                                                           if p not in ("num_classes", "input_shape")]}
                   for e in r} for k, r in regs.items()}
        for name, entry in doc["attacks"].items():
            entry["defaults"] = defaults(name)
        print_json(doc)
        return
    for kind, reg in regs.items():
        t = Table(title=kind, title_justify="left", show_header=kind == "attacks")
        t.add_column("name", style="bold")
        t.add_column("description")
        if kind == "attacks":
            t.add_column("defaults per data kind (keys you set win; epochs: train.epochs)")
        for e in reg:
            if kind == "attacks":
                d = defaults(e.name)
                lines = [f"{k}: {_defaults_text(d[k])}" for k in DATA_KINDS]
                for ds in declared_datasets(e.name):  # only what the data set changes from its kind's
                    base = d.get(data_kind(ds) or "", {})
                    lines.append(f"on {ds}: {_defaults_text({k: v for k, v in d[ds].items() if base.get(k) != v})}")
                t.add_row(e.name, e.description, "\n".join(lines), end_section=True)
            else:
                t.add_row(e.name, e.description)
        out.print(t)


def _defaults_text(d: dict) -> str:
    """``mode all-to-one, rate 0.1, epochs 10`` (floats in short form)."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items()) or "-"


@handles_errors
def runs(store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt,
         limit: int = typer.Option(50, help="show at most this many (newest first)")) -> None:
    """List stored runs."""
    from backdoorlab.store import Store

    recs = Store(store).runs(limit=limit)
    if as_json:
        print_json({"runs": [r.summary() for r in recs]})
        return
    t = Table(title=f"{len(recs)} run(s)")
    for col in ("run id", "name", "created", "CA", "ASR", "seconds"):
        t.add_column(col)
    for r in recs:
        s = r.summary()
        t.add_row(r.run_id, r.name, s["created"], fmt(r.metrics.get("clean_accuracy", "-")),
                  fmt(r.metrics.get("attack_success_rate", "-")), fmt(r.seconds))
    out.print(t)


@handles_errors
def show(run_id: str = typer.Argument(..., help="a run id or a unique prefix"), store: Optional[Path] = StoreOpt,
         as_json: bool = JsonOpt) -> None:
    """Show one stored run: config, metrics and artifacts."""
    from backdoorlab.store import Store

    rec = Store(store).get(run_id)
    if as_json:
        print_json({**rec.summary(), "config": rec.config, "metrics": rec.metrics, "artifacts": rec.artifacts})
        return
    out.print(f"[bold]run {rec.run_id}[/bold]  {rec.name}  ({rec.status}, {rec.seconds:.1f} s)  {rec.run_dir}")
    t = Table(title="metrics", title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rec.metrics.items():
        t.add_row(k, fmt(v))
    out.print(t)
    t = Table(title="artifacts", title_justify="left")
    t.add_column("kind")
    t.add_column("path")
    for k, v in rec.artifacts.items():
        t.add_row(k, str(Path(rec.run_dir) / v))
    out.print(t)
    import yaml

    out.print("config:")
    out.print(yaml.safe_dump(rec.config, sort_keys=False), markup=False)
