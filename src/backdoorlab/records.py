"""The one record writer: a run's folder (config, weights, history, figures, metrics, extra JSON)
and its :class:`~backdoorlab.store.RunRecord`, committed atomically. ``backdoorlab run`` and the
grid's cells both store their results through :func:`write_run`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from backdoorlab.config import ExperimentConfig, dump_config
from backdoorlab.store import RunRecord, Store, atomic_write_bytes, atomic_write_json, atomic_write_text


def write_run(store: Store, run_id: str, *, name: str, kind: str, config: ExperimentConfig, metrics: dict[str, float],
              seconds: float, figures: dict[str, bytes] | None = None, weights: bytes | Any | None = None,
              history: dict | None = None, extra_json: dict[str, Any] | None = None, created: float | None = None,
              commit: Callable[[RunRecord, Path], RunRecord] | None = None) -> RunRecord:
    """Write a run folder and index it, all or nothing. ``figures``: stem -> PNG bytes (written to
    ``figures/<stem>.png``, artifact ``figure:<stem>``). ``weights``: safetensors bytes, or a model
    (saved with its spec). ``extra_json``: file stem -> JSON object. ``commit`` replaces
    :meth:`Store.commit` (the grid stores the cell row in the same transaction)."""
    created = time.time() if created is None else created
    with store.new_run(run_id) as tmp:
        artifacts: dict[str, str] = {}
        atomic_write_text(tmp / "config.yaml", dump_config(config))
        artifacts["config"] = "config.yaml"
        for stem, obj in (extra_json or {}).items():
            atomic_write_json(tmp / f"{stem}.json", obj)
            artifacts[stem] = f"{stem}.json"
        if isinstance(weights, (bytes, bytearray)):
            atomic_write_bytes(tmp / "weights.safetensors", bytes(weights))
            artifacts["weights"] = "weights.safetensors"
        elif weights is not None:
            from backdoorlab.models import save_model

            save_model(weights, tmp / "weights.safetensors")
            atomic_write_text(tmp / "model.json", weights.spec.to_json() + "\n")
            artifacts["weights"] = "weights.safetensors"
        if history:
            atomic_write_json(tmp / "history.json", history)
        for stem, png in (figures or {}).items():
            rel = f"figures/{stem}.png"
            atomic_write_bytes(tmp / rel, png)
            artifacts[f"figure:{stem}"] = rel
        atomic_write_json(tmp / "metrics.json", {**metrics, "seconds": seconds})
        artifacts["metrics"] = "metrics.json"
        record = RunRecord(run_id=run_id, name=name, kind=kind, created=created, status="done", seconds=seconds,
                           config=config.model_dump(mode="json"), metrics=dict(metrics), artifacts=artifacts,
                           victim_key=config.victim_key())
        return (commit or store.commit)(record, tmp)


def victim_figures(prep: Any, history: dict, title: str) -> dict[str, bytes]:
    """The victim's figures: poisoned samples beside their clean originals, and the training curves."""
    from backdoorlab.experiment import _sample_figure
    from backdoorlab.plots import training_curves

    figs: dict[str, bytes] = {}
    fig = _sample_figure(prep)
    if fig is not None:
        figs["samples"] = fig
    if history.get("epochs"):
        figs["training"] = training_curves(history["epochs"], title)
    return figs
