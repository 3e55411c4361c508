"""The ``backdoorlab`` command line (typer).

Results go to stdout (a table, or one JSON object with ``--json``); logs and progress go to
stderr. Bad input prints one ``error: ...`` line and exits with code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from backdoorlab.errors import BackdoorLabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Attack and defend image classifiers against backdoor data poisoning.")
# piped or redirected output has no terminal width; rich would then squeeze tables into 80 columns
# and cut every cell to a few characters, so give it room (a terminal keeps its own width)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 240)
err = Console(stderr=True)

def handles_errors(fn):
    """Turn :class:`BackdoorLabError` into one line on stderr and exit code 2 (no traceback)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BackdoorLabError as exc:
            err.print(f"[bold red]error:[/bold red] {exc}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


StoreOpt = typer.Option(None, "--store", help="results folder (default ./backdoorlab-runs or $BACKDOORLAB_HOME)")
JsonOpt = typer.Option(False, "--json", help="print one JSON object on stdout")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)], force=True)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _print_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(_clean(obj), sort_keys=True) + "\n")
    sys.stdout.flush()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


class _Progress:
    """Training progress bar on stderr (silent when stderr is not a terminal)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and err.is_terminal
        self.bar = None
        self.task = None

    def __call__(self, event: str, **info: Any) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if event == "train_start":
            self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                                TimeRemainingColumn(), console=err, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("", total=info["total_steps"])
        elif event == "step" and self.bar is not None:
            self.bar.update(self.task, completed=info["step"], description=f"epoch {info['epoch'] + 1}")
        elif event == "epoch_end" and self.bar is not None:
            s = info["stats"]
            if s.epoch == getattr(self, "_epochs", -1):
                pass
            self.bar.console.log(f"epoch {s.epoch}: loss {s.loss:.4f}, train acc {s.train_accuracy:.4f}, "
                                 f"{s.images_per_second:.0f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@app.command()
@handles_errors
def run(
    config: Optional[Path] = typer.Argument(None, help="experiment YAML (default: BadNets on the embedded mnist5k)"),
    set_: List[str] = typer.Option([], "--set", help="override a config key, e.g. --set attack.target=1 (repeatable)"),
    store: Optional[Path] = StoreOpt,
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log each stage to stderr"),
) -> None:
    """Poison a data set, train a victim, report clean accuracy (CA) and attack success rate (ASR)."""
    from backdoorlab.config import load_config
    from backdoorlab.experiment import run as run_experiment
    from backdoorlab.store import Store

    _setup_logging(verbose)
    cfg = load_config(config, set_)
    st = Store(store)
    progress = _Progress(enabled=True)
    try:
        rec = run_experiment(cfg, st, callbacks=(progress,))
    finally:
        progress.close()
    m = rec.metrics
    result = {"run_id": rec.run_id, "name": rec.name, "clean_accuracy": m.get("clean_accuracy"),
              "attack_success_rate": m.get("attack_success_rate"), "robust_accuracy": m.get("robust_accuracy"),
              "poison_count": m.get("poison_count"), "seconds": round(rec.seconds, 3),
              "victim_from_cache": bool(m.get("victim_from_cache")), "run_dir": rec.run_dir}
    if as_json:
        _print_json(result)
        return
    t = Table(title=f"run {rec.run_id} ({cfg.data.name}, {cfg.model.name}, "
                    f"{cfg.attack.name + ' ' + cfg.attack.mode if cfg.attack else 'no attack'})")
    for col in ("CA", "ASR", "RA", "poisoned", "seconds"):
        t.add_column(col, justify="right")
    t.add_row(*(_fmt(v) if v is not None else "-" for v in (
        result["clean_accuracy"], result["attack_success_rate"], result["robust_accuracy"],
        int(result["poison_count"]) if result["poison_count"] is not None else None, result["seconds"])))
    out.print(t)
    out.print(f"run folder: {rec.run_dir}" + ("  (victim reused from cache)" if result["victim_from_cache"] else ""))


@app.command("list")
@handles_errors
def list_(as_json: bool = JsonOpt) -> None:
    """List the registered data sets, models and attacks."""
    from backdoorlab.attacks import ATTACKS
    from backdoorlab.data import DATASETS
    from backdoorlab.models import MODELS

    regs = {"datasets": DATASETS, "models": MODELS, "attacks": ATTACKS}
    try:
        from backdoorlab.defenses import DEFENSES

        regs["defenses"] = DEFENSES
    except ImportError:
        pass
    if as_json:
        _print_json({k: {e.name: {"description": e.description, "parameters": [p for p in r.parameters(e.name)
                                                                                 if p not in ("num_classes", "input_shape")]}
                         for e in r} for k, r in regs.items()})
        return
    for kind, reg in regs.items():
        t = Table(title=kind, title_justify="left", show_header=False)
        t.add_column("name", style="bold")
        t.add_column("description")
        for e in reg:
            t.add_row(e.name, e.description)
        out.print(t)


@app.command()
@handles_errors
def runs(store: Optional[Path] = StoreOpt, as_json: bool = JsonOpt,
         limit: int = typer.Option(50, help="show at most this many (newest first)")) -> None:
    """List stored runs."""
    from backdoorlab.store import Store

    recs = Store(store).runs(limit=limit)
    if as_json:
        _print_json({"runs": [r.summary() for r in recs]})
        return
    t = Table(title=f"{len(recs)} run(s)")
    for col in ("run id", "name", "created", "CA", "ASR", "seconds"):
        t.add_column(col)
    for r in recs:
        s = r.summary()
        t.add_row(r.run_id, r.name, s["created"], _fmt(r.metrics.get("clean_accuracy", "-")),
                  _fmt(r.metrics.get("attack_success_rate", "-")), _fmt(r.seconds))
    out.print(t)


@app.command()
@handles_errors
def show(run_id: str = typer.Argument(..., help="a run id or a unique prefix"), store: Optional[Path] = StoreOpt,
         as_json: bool = JsonOpt) -> None:
    """Show one stored run: config, metrics and artifacts."""
    from backdoorlab.store import Store

    rec = Store(store).get(run_id)
    if as_json:
        _print_json({**rec.summary(), "config": rec.config, "metrics": rec.metrics, "artifacts": rec.artifacts})
        return
    out.print(f"[bold]run {rec.run_id}[/bold]  {rec.name}  ({rec.status}, {rec.seconds:.1f} s)  {rec.run_dir}")
    t = Table(title="metrics", title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in rec.metrics.items():
        t.add_row(k, _fmt(v))
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


def _write_dir_atomically(final: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (relative path -> bytes) into a temp folder and rename it to ``final``."""
    import shutil
    import tempfile

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        for rel, data in files.items():
            f = tmp / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(data)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- defenses on files
def _load_labelled(spec: str, num_classes: int | None, *, split: str = "train", what: str = "data"):
    """An ImageSet from an npz (with ``num_classes`` forced to the model's), a folder or a data set name.
    ``split="test"`` prefers the test part of a source that has one and falls back to the whole file."""
    from backdoorlab.data import load_source
    from backdoorlab.inputs import load_images

    p = Path(spec)
    if p.suffix == ".npz" or p.is_file():
        raw = load_source("npz", path=str(p), num_classes=num_classes)
    else:
        try:
            return load_images(spec, split=split)
        except BackdoorLabError as exc:
            if split != "test" or "no test split" not in str(exc):
                raise
            return load_images(spec)
    return raw.test if split == "test" and raw.test is not None else raw.train


def _load_unlabelled(spec: str, num_classes: int):
    """Inputs to screen: an npz whose ``y`` is optional (``is_poison``, when present, is the ground
    truth), a folder or a data set name. Returns (ImageSet, truth or None)."""
    import numpy as np
    import torch

    from backdoorlab.data import to_imageset

    p = Path(spec)
    if p.suffix != ".npz":
        return _load_labelled(spec, num_classes, what="--inputs"), None
    if not p.is_file():
        raise BackdoorLabError(f"--inputs: file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError) as exc:
        raise BackdoorLabError(f"--inputs: {p} is not a readable .npz file ({exc})") from exc
    xk = "x" if "x" in arrays else "x_train" if "x_train" in arrays else None
    if xk is None:
        raise BackdoorLabError(f"--inputs: {p} has no images: expected key x (uint8 (N,H,W[,C])); found {sorted(arrays)}")
    x = arrays[xk]
    y = arrays.get("y" if xk == "x" else "y_train")
    if y is None or y.shape[:1] != x.shape[:1]:
        y = np.zeros(x.shape[0], dtype=np.int64)
    y = np.clip(y.astype(np.int64), 0, num_classes - 1)
    data = to_imageset(x, y, name=p.stem, num_classes=num_classes)
    truth = arrays.get("is_poison")
    if truth is not None:
        if truth.shape != (len(data),):
            raise BackdoorLabError(f"--inputs: is_poison has shape {truth.shape}; expected ({len(data)},), one flag per image")
        truth = torch.from_numpy(truth.astype(bool))
    return data, truth


def _method_params(items: List[str]) -> dict:
    from backdoorlab.config import parse_override

    params: dict = {}
    for item in items:
        parts, value = parse_override(item)
        if len(parts) != 1:
            raise BackdoorLabError(f"--param {item!r}: expected NAME=VALUE, e.g. --param tolerance=0.01")
        params[parts[0]] = value
    return params


def _write_figure(folder: Path, name: str, png: bytes) -> str:
    from backdoorlab.store import atomic_write_bytes

    path = folder / name
    atomic_write_bytes(path, png)
    return str(path)


@app.command()
@handles_errors
def audit(
    model: Path = typer.Option(..., "--model", help="TorchScript file, or safetensors weights (backdoorlab's, or with --arch)"),
    data: str = typer.Option(..., "--data", help="clean images: .npz (its test split if it has one), image folder, or data set name"),
    train: Optional[str] = typer.Option(None, "--train", help="the training set to cleanse (.npz / folder): flags poisoned samples"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture for plain safetensors weights (see `backdoorlab list`)"),
    pi: float = typer.Option(0.9, "--pi", help="group misclassification fraction a pattern must reach"),
    images_per_class: int = typer.Option(100, "--images-per-class", help="clean images per class used by the scan"),
    statistic: str = typer.Option("min-norm", "--statistic", help="min-norm (smallest pattern; default) or seed (seed 000's)"),
    technique: int = typer.Option(2, "--technique", help="cleansing technique of seed 000: 1 (label change) or 2 (confidence drop)"),
    relabel: str = typer.Option("auto", "--relabel", help="label correction: auto (the flagged pairs' sources unless the "
                                "target's whole column is flagged), source, or prediction (seed 000's: the label predicted on [x - v])"),
    report: Optional[Path] = typer.Option(None, "--out", help="report folder (figures, flagged samples); default ./audit-<time>"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Is this model backdoored? Reverse-engineer a trigger for every (source, target) pair, flag
    outliers; with --train, find the poisoned training samples and correct their labels."""
    import time as _time

    import numpy as np
    import torch

    from backdoorlab import plots
    from backdoorlab.defenses import DEFENSES
    from backdoorlab.inputs import load_images, load_model_for

    _setup_logging(verbose)
    t0 = _time.perf_counter()
    clean = load_images(data, split="auto")
    net = load_model_for(model, clean, arch=arch)
    insp = DEFENSES.build("pairwise", {"pi": pi, "images_per_class": images_per_class, "statistic": statistic,
                                      "seed": seed}, where="audit")
    res = insp.inspect(net, clean)
    result: dict[str, Any] = {
        "backdoored": res.backdoored, "flagged_pairs": [list(p) for p in res.flagged_pairs],
        "flagged_targets": res.flagged_targets, "anomaly_index": res.max_anomaly, "statistic": statistic,
        "top_pairs": [{"source": s, "target": t, "norm": n, "anomaly_index": a} for s, t, n, a in res.details["ranking"][:5]],
    }
    files: dict[str, bytes] = {
        "figures/patterns.png": plots.pattern_grid(res.patterns, False, highlight=res.flagged_pairs),
        "figures/patterns_normalised.png": plots.pattern_grid(res.patterns, True, highlight=res.flagged_pairs),
        "figures/pair_norms.png": plots.pair_scatter(res.scores, res.flagged_pairs, ylabel=f"{insp.norm} norm of v"),
    }
    for s, t in res.flagged_pairs[:4]:
        files[f"figures/pattern_{s}_to_{t}.png"] = plots.compare_images([res.patterns[s, t]], [f"estimated {s}->{t}"])
    if train is not None:
        tr = load_images(train, split="train")
        if tr.shape != clean.shape or tr.num_classes != clean.num_classes:
            raise BackdoorLabError(f"--train images {tr.shape} / {tr.num_classes} classes differ from --data "
                                   f"{clean.shape} / {clean.num_classes} classes")
        cl = DEFENSES.build("pattern-subtraction", {"technique": technique, "relabel": relabel, "seed": seed}, where="audit")
        c = cl.cleanse(net, tr, inspection=res)
        flagged_idx = torch.nonzero(c.flagged).flatten()
        result["flagged_indices"] = flagged_idx.tolist()
        result["corrected_labels"] = c.corrected_labels[flagged_idx].tolist()
        result["threshold"] = c.threshold
        lines = ["index,label,corrected_label,score"] + [
            f"{i},{int(tr.y[i])},{int(c.corrected_labels[i])},{float(c.scores[i]):.6f}" for i in flagged_idx.tolist()]
        files["flagged.csv"] = ("\n".join(lines) + "\n").encode()
        import io

        buf = io.BytesIO()
        np.savez(buf, flagged=c.flagged.numpy(), scores=c.scores.numpy(), corrected_labels=c.corrected_labels.numpy())
        files["cleanse.npz"] = buf.getvalue()
        if int(c.details.get("examined", 0)):
            files["figures/score_histogram.png"] = plots.score_histogram(
                c.scores[c.scores != 0], c.threshold, xlabel="p(y|x) - p(y|[x - v])",
                title="confidence drop when the estimated trigger is removed")
    result["seconds"] = round(_time.perf_counter() - t0, 3)
    files["audit.json"] = (json.dumps(_clean(result), indent=2, sort_keys=True) + "\n").encode()
    folder = report or Path(f"audit-{_time.strftime('%Y%m%d-%H%M%S')}")
    _write_dir_atomically(folder, files)
    result["report_dir"] = str(folder)
    if as_json:
        _print_json(result)
        return
    verdict = "[bold red]BACKDOOR FOUND[/bold red]" if res.backdoored else "[bold green]no backdoor found[/bold green]"
    out.print(f"{verdict}  (statistic {statistic}, max anomaly index {res.max_anomaly:.2f}, threshold {insp.threshold})")
    t = Table(title="most suspicious pairs")
    for col in ("source", "target", f"{insp.norm} norm", "anomaly index", "flagged"):
        t.add_column(col, justify="right")
    for s, tt, n, a in res.details["ranking"][:5]:
        t.add_row(str(s), str(tt), f"{n:.3f}", f"{a:.2f}", "yes" if (s, tt) in res.flagged_pairs else "")
    out.print(t)
    if train is not None:
        out.print(f"flagged {len(result['flagged_indices'])} training samples (see {folder / 'flagged.csv'})")
    out.print(f"report: {folder}  ({result['seconds']:.1f} s)")


@app.command()
@handles_errors
def repair(
    model: Path = typer.Option(..., "--model", help="model file: backdoorlab safetensors, or TorchScript"),
    clean: str = typer.Option(..., "--clean", help="the defender's clean images (npz, folder or data set name)"),
    method: str = typer.Option("fine-pruning", "--method", help="a repairer: fine-pruning, pruning, fine-tuning"),
    eval_: Optional[str] = typer.Option(None, "--eval", help="clean test images for CA along the curve (an npz's test part if it has one)"),
    triggered: Optional[str] = typer.Option(None, "--triggered", help="triggered images labelled with the attacker's target, for ASR"),
    param: List[str] = typer.Option([], "--param", "-p", help="a method parameter, e.g. -p tolerance=0.01 (repeatable)"),
    clean_size: Optional[int] = typer.Option(None, "--clean-size", min=1, help="use a stratified subsample of this many clean images"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture of plain safetensors weights without a spec"),
    out_path: Optional[Path] = typer.Option(None, "--out", help="write the repaired model here (.safetensors)"),
    figures: Optional[Path] = typer.Option(None, "--figures", help="write the CA/ASR vs pruned fraction figure into this folder"),
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log each step to stderr"),
) -> None:
    """Repair a model with pruning / fine-tuning / fine-pruning on clean data; report the CA/ASR curve."""
    import time

    import torch

    from backdoorlab.data import stratified_subsample
    from backdoorlab.defenses import DEFENSES
    from backdoorlab.inputs import load_model_for
    from backdoorlab.models import save_model

    _setup_logging(verbose)
    entry = DEFENSES.get(method)
    if getattr(entry.factory, "family", "") != "repairer":
        repairers = [e.name for e in DEFENSES if getattr(e.factory, "family", "") == "repairer"]
        raise BackdoorLabError(f"--method {method!r} is not a repairer; repairers: {', '.join(repairers)}")
    defense = DEFENSES.build(method, _method_params(param), where="--param")
    if out_path is not None and out_path.suffix != ".safetensors":
        raise BackdoorLabError(f"--out {out_path}: the repaired model is written as safetensors; use a .safetensors name")
    clean_set = _load_labelled(clean, None, what="--clean")
    net = load_model_for(model, clean_set, arch=arch)
    if clean_size is not None:
        clean_set = stratified_subsample(clean_set, clean_size, torch.Generator().manual_seed(0))
    eval_set = _load_labelled(eval_, clean_set.num_classes, split="test", what="--eval") if eval_ else None
    trig_set = _load_labelled(triggered, clean_set.num_classes, what="--triggered") if triggered else None
    t0 = time.perf_counter()
    result = defense.repair(net, clean_set, eval_clean=eval_set, eval_triggered=trig_set)
    seconds = time.perf_counter() - t0
    d = result.details
    written: dict[str, str] = {}
    if out_path is not None:
        if getattr(result.model, "spec", None) is None:
            raise BackdoorLabError("this model has no backdoorlab spec (a TorchScript file?); it cannot be written as safetensors")
        save_model(result.model, out_path)
        written["model"] = str(out_path)
    if figures is not None:
        from backdoorlab.plots_defenses import pruning_curve

        written["curve"] = _write_figure(figures, "repair_curve.png", pruning_curve(
            result.curve, chosen=d.get("pruned_fraction"), title=f"{method} on {Path(str(model)).name}"))
    summary = {"method": method, "clean_accuracy": d.get("clean_accuracy"), "attack_success_rate": d.get("attack_success_rate"),
               "pruned_fraction": d.get("pruned_fraction", 0.0), "holdout_accuracy": d.get("holdout_accuracy"),
               "clean_accuracy_before": d.get("clean_accuracy_before"),
               "attack_success_rate_before": d.get("attack_success_rate_before"),
               "holdout_accuracy_before": d.get("holdout_accuracy_before"), "layer": d.get("layer"),
               "clean_size": len(clean_set), "seconds": round(seconds, 3), "written": written, "curve": result.curve}
    if as_json:
        _print_json(summary)
        return
    t = Table(title=f"{method}: curve ({d.get('layer', '-')}, {len(clean_set)} clean images)")
    cols = [k for k in ("pruned_fraction", "finetuned", "holdout_accuracy", "clean_accuracy", "attack_success_rate")
            if any(k in r for r in result.curve)]
    for c in cols:
        t.add_column(c.replace("_", " "), justify="right")
    for r in result.curve:
        t.add_row(*(_fmt(r[c]) if c in r else "-" for c in cols))
    out.print(t)
    before = ", ".join(f"{k} {_fmt(summary[k + '_before'])}" for k in ("clean_accuracy", "attack_success_rate", "holdout_accuracy")
                       if summary.get(k + "_before") is not None)
    after = ", ".join(f"{k} {_fmt(summary[k])}" for k in ("clean_accuracy", "attack_success_rate", "holdout_accuracy")
                      if summary.get(k) is not None)
    out.print(f"pruned fraction {_fmt(float(summary['pruned_fraction']))}; before: {before}; after: {after}; {seconds:.1f} s")
    for k, v in written.items():
        out.print(f"wrote {k}: {v}")


@app.command()
@handles_errors
def guard(
    model: Path = typer.Option(..., "--model", help="model file: backdoorlab safetensors, or TorchScript"),
    clean: str = typer.Option(..., "--clean", help="clean held-out images that set the threshold (npz, folder or data set name)"),
    inputs: str = typer.Option(..., "--inputs", help="images to screen: npz (y optional; is_poison = ground truth), folder or name"),
    samples: int = typer.Option(20, "--samples", min=2, help="superimposed copies per input (N)"),
    frr: float = typer.Option(0.01, "--frr", help="preset false rejection rate on clean inputs"),
    superimpose: str = typer.Option("sum", "--superimpose", help="sum (x+h saturated at 1), add (x+h unclipped, the paper's float code) or average (ART's 50/50)"),
    threshold_rule: str = typer.Option("quantile", "--threshold-rule", help="quantile of the clean entropies, or normal (the paper's fit)"),
    clean_size: Optional[int] = typer.Option(None, "--clean-size", min=1, help="use a stratified subsample of this many clean images"),
    seed: int = typer.Option(0, "--seed", min=0, help="seed of the clean images drawn for the blends"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture of plain safetensors weights without a spec"),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="write index,prediction,score,flagged per input here"),
    figures: Optional[Path] = typer.Option(None, "--figures", help="write the entropy histogram into this folder"),
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log to stderr"),
) -> None:
    """Screen inputs with STRIP: flag trojaned inputs; the guarded prediction is class K for them."""
    import time

    import torch

    from backdoorlab import metrics as M
    from backdoorlab.data import stratified_subsample
    from backdoorlab.defenses import DEFENSES, Guarded
    from backdoorlab.inputs import load_model_for

    _setup_logging(verbose)
    detector = DEFENSES.build("strip", {"samples": samples, "frr": frr, "superimpose": superimpose,
                                        "threshold_rule": threshold_rule, "seed": seed}, where="guard")
    clean_set = _load_labelled(clean, None, what="--clean")
    net = load_model_for(model, clean_set, arch=arch)
    if clean_size is not None:
        clean_set = stratified_subsample(clean_set, clean_size, torch.Generator().manual_seed(0))
    data, truth = _load_unlabelled(inputs, clean_set.num_classes)
    if data.shape != clean_set.shape:
        raise BackdoorLabError(f"--inputs images have shape {data.shape} but --clean images {clean_set.shape}; use one image size")
    detector.fit(net, clean_set)
    t0 = time.perf_counter()
    pred, det = Guarded(net, detector).guard(data.x)
    seconds = time.perf_counter() - t0
    k = clean_set.num_classes
    result: dict[str, Any] = {
        "num_inputs": len(data), "num_flagged": int(det.flagged.sum()), "threshold": det.threshold,
        "entropy_threshold": detector.entropy_threshold, "trojaned_class": k, "samples": samples, "frr_preset": frr,
        "superimpose": superimpose, "inputs_per_second": len(data) / max(seconds, 1e-9), "seconds": round(seconds, 3),
        "flagged": det.flagged.tolist(), "scores": [round(float(s), 6) for s in det.scores],
        "predictions": pred.tolist(),
    }
    if truth is not None:
        result.update(frr=M.frr(det.flagged[~truth]), far=M.far(det.flagged[truth]), auroc=M.auroc(det.scores, truth),
                      num_trojaned=int(truth.sum()))
    written: dict[str, str] = {}
    if csv_path is not None:
        from backdoorlab.store import atomic_write_text

        lines = ["index,prediction,score,flagged"]
        lines += [f"{i},{int(p)},{float(s):.6f},{int(bool(f))}" for i, (p, s, f) in enumerate(zip(pred, det.scores, det.flagged))]
        atomic_write_text(csv_path, "\n".join(lines) + "\n")
        written["csv"] = str(csv_path)
    if figures is not None:
        from backdoorlab.plots_defenses import entropy_histogram

        ent = -det.scores
        if truth is not None:
            a, b, labels = ent[~truth], ent[truth], ("clean inputs", "trojaned inputs")
        else:
            a, b, labels = detector.clean_entropy, ent, ("clean held-out", "inputs")
        written["histogram"] = _write_figure(figures, "strip_entropy.png", entropy_histogram(
            a, b, boundary=detector.entropy_threshold, labels=labels, title=f"STRIP, N={samples}, {superimpose}"))
    result["written"] = written
    if as_json:
        _print_json(result)
        return
    msg = (f"{result['num_flagged']} of {len(data)} inputs flagged as trojaned (class {k}); entropy boundary "
           f"{detector.entropy_threshold:.4f} bits at preset FRR {frr}; {result['inputs_per_second']:.0f} inputs/s")
    if truth is not None:
        msg += f"; FRR {result['frr']:.4f}, FAR {result['far']:.4f}, AUROC {result['auroc']:.4f}"
    out.print(msg)
    for kind, v in written.items():
        out.print(f"wrote {kind}: {v}")


def _write_report(folder: Optional[Path], name: str, result: dict, files: dict[str, bytes]) -> Path:
    """Write ``files`` and ``<name>.json`` (the result) atomically into ``folder`` (default
    ./<name>-<time>); adds ``report_dir`` to ``result``."""
    import time as _time

    folder = folder or Path(f"{name}-{_time.strftime('%Y%m%d-%H%M%S')}")
    _write_dir_atomically(folder, {**files, f"{name}.json": (json.dumps(_clean(result), indent=2, sort_keys=True) + "\n").encode()})
    result["report_dir"] = str(folder)
    return folder


@app.command()
@handles_errors
def biasmaps(
    model: Path = typer.Option(..., "--model", help="the suspect: TorchScript file, or safetensors weights (backdoorlab's, or with --arch)"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="a clean reference model (same classes and images); "
                                             "without it each class is compared with the others (weaker)"),
    data: str = typer.Option(..., "--data", help="clean images: .npz (its test split if it has one), image folder, or data set name"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture of plain safetensors suspect weights"),
    reference_arch: Optional[str] = typer.Option(None, "--reference-arch", help="architecture of plain safetensors reference weights"),
    inputs: List[str] = typer.Option(["data", "noise"], "--inputs", help="starting inputs: blank, noise, data (repeatable)"),
    eps: List[float] = typer.Option([0.1], "--eps", help="I-FGSM step in (0, 1] (repeatable: one figure row each)"),
    iterations: int = typer.Option(10, "--iterations", help="I-FGSM iterations"),
    samples: int = typer.Option(1000, "--samples", help="Algorithm I: starting images per class"),
    pair_samples: int = typer.Option(20, "--pair-samples", help="Algorithm II: starting images per (source, target) pair; 0 skips it"),
    threshold: float = typer.Option(3.0, "--threshold", help="MAD anomaly index above which a class is flagged"),
    statistic: str = typer.Option("stamp", "--statistic", help="class statistic: stamp (default; needs --reference), "
                                  "euclidean (the seed's map distance) or local"),
    seed: int = typer.Option(0, "--seed"),
    report: Optional[Path] = typer.Option(None, "--out", help="report folder (figures, biasmaps.json); default ./biasmaps-<time>"),
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Is this model backdoored? Compare its adversarial bias maps (mean I-FGSM images per class and
    per (source, target) pair) with a clean reference model's (seed 002)."""
    import time as _time

    from backdoorlab.defenses import DEFENSES
    from backdoorlab.inputs import load_images, load_model_for
    from backdoorlab.plots_biasmaps import figures

    _setup_logging(verbose)
    t0 = _time.perf_counter()
    insp = DEFENSES.build("bias-maps", {"inputs": tuple(inputs), "eps": tuple(eps), "iterations": iterations,
                                        "samples_per_class": samples, "pair_samples": pair_samples,
                                        "threshold": threshold, "statistic": statistic, "seed": seed}, where="biasmaps")
    clean = load_images(data, split="auto")
    net = load_model_for(model, clean, arch=arch)
    ref = None
    if reference is not None:
        try:
            ref = load_model_for(reference, clean, arch=reference_arch)
        except BackdoorLabError as exc:
            raise BackdoorLabError(f"--reference {reference}: {exc}; the reference must be a model of the same task as "
                                   "the suspect (same classes, same image shape)") from None
    res = insp.inspect(net, clean, reference=ref)
    d = res.details
    k = clean.num_classes
    pair_a = d["pair_anomaly"]
    top_pairs = []
    if pair_a is not None:
        a = pair_a.clone()
        a[~a.isfinite()] = -float("inf")
        for i in a.flatten().argsort(descending=True)[:5].tolist():
            s, t = divmod(int(i), k)
            top_pairs.append({"source": s, "target": t, "distance": float(d["pair_distance"][s, t]),
                              "anomaly_index": float(pair_a[s, t])})
    result: dict[str, Any] = {
        "backdoored": res.backdoored, "flagged_classes": res.flagged_targets,
        "class_distance": [round(float(v), 6) for v in d["class_distance"]],
        "class_statistic": [round(float(v), 6) for v in d["class_statistic"]],
        "anomaly_index": [round(float(v), 4) for v in res.anomaly], "top_class": d["top_class"],
        "flagged_pairs": [list(p) for p in res.flagged_pairs], "top_pairs": top_pairs,
        "reference": d["reference"], "settings": d["settings"], "statistic": d["statistic"],
        "percent": {n: [round(float(v), 3) for v in e["suspect_percent"]] for n, e in d["bias_maps"].items()},
        "seconds_algorithm1": round(d["seconds_algorithm1"], 3), "seconds_algorithm2": round(d["seconds_algorithm2"], 3),
    }
    files = {f"figures/{n}": png for n, png in figures(res).items()}
    result["seconds"] = round(_time.perf_counter() - t0, 3)
    folder = _write_report(report, "biasmaps", result, files)
    if as_json:
        _print_json(result)
        return
    verdict = "[bold red]BACKDOOR FOUND[/bold red]" if res.backdoored else "[bold green]no backdoor found[/bold green]"
    out.print(f"{verdict}  (reference: {d['reference']}; flagged classes {res.flagged_targets}, pairs {res.flagged_pairs})")
    t = Table(title=f"per-class bias-map distance and {d['statistic']} statistic")
    for col in ("class", "distance", "statistic", "anomaly index", "flagged"):
        t.add_column(col, justify="right")
    for c in range(k):
        t.add_row(str(c), f"{float(d['class_distance'][c]):.3f}", f"{float(d['class_statistic'][c]):.3f}",
                  f"{float(res.anomaly[c]):.2f}", "yes" if c in res.flagged_targets else "")
    out.print(t)
    out.print(f"report: {folder}  ({result['seconds']:.1f} s)")


def _npz_truth(spec: str, n: int):
    """``is_poison`` (N,) bool of an .npz training set when it carries one (ground truth, for reporting only)."""
    import numpy as np
    import torch

    p = Path(spec)
    if p.suffix != ".npz" or not p.is_file():
        return None
    with np.load(p, allow_pickle=False) as f:
        if "is_poison" not in f.files:
            return None
        truth = f["is_poison"]
    if truth.shape != (n,):
        raise BackdoorLabError(f"--data: is_poison has shape {truth.shape}; expected ({n},), one flag per training image")
    return torch.from_numpy(truth.astype(bool))


@app.command("train-robust")
@handles_errors
def train_robust(
    data: str = typer.Option(..., "--data", help="the (possibly poisoned) training set: .npz (x, y; is_poison, when present, "
                                                 "is ground truth used only to report), image folder or data set name"),
    model: str = typer.Option("cnn", "--model", help="architecture to train (see `backdoorlab list`)"),
    method: str = typer.Option("abl", "--method", help="a robust trainer: abl"),
    export: Optional[Path] = typer.Option(None, "--export", help="write the trained model here as TorchScript (.pt)"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="also write backdoorlab safetensors weights here"),
    param: List[str] = typer.Option([], "--param", "-p", help="a method parameter, e.g. -p isolation_ratio=0.02 (repeatable)"),
    holdout_fraction: float = typer.Option(0.1, "--holdout-fraction", help="stratified share of --data held out to check "
                                                                           "and report clean accuracy (it may hold poison too)"),
    seed: int = typer.Option(0, "--seed", min=0, help="seed of the split, the initial weights and the training order"),
    figures: Optional[Path] = typer.Option(None, "--figures", help="write the per-sample loss curves into this folder"),
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log each phase to stderr"),
) -> None:
    """Train a model on possibly poisoned data with a robust trainer (Anti-Backdoor Learning): isolate
    the suspected poisoned samples, train without them and unlearn them; export the model."""
    import time

    import torch

    from backdoorlab.data import stratified_indices
    from backdoorlab.defenses import DEFENSES
    from backdoorlab.inputs import load_images
    from backdoorlab.models import ModelSpec, build_model, export_torchscript, save_model
    from backdoorlab.train import evaluate

    _setup_logging(verbose)
    entry = DEFENSES.get(method)
    if getattr(entry.factory, "family", "") != "robust-trainer":
        names = [e.name for e in DEFENSES if getattr(e.factory, "family", "") == "robust-trainer"]
        raise BackdoorLabError(f"--method {method!r} is not a robust trainer; robust trainers: {', '.join(names)}")
    trainer = DEFENSES.build(method, _method_params(param), where="--param")
    if export is not None and export.suffix not in (".pt", ".pth", ".ts"):
        raise BackdoorLabError(f"--export {export}: the model is written as TorchScript; use a .pt name")
    if weights is not None and weights.suffix != ".safetensors":
        raise BackdoorLabError(f"--weights {weights}: use a .safetensors name")
    if not 0.0 < holdout_fraction < 0.5:
        raise BackdoorLabError(f"--holdout-fraction must lie in (0, 0.5); got {holdout_fraction}")
    full = load_images(data, split="train")
    truth = _npz_truth(data, len(full))
    train_idx, hold_idx = stratified_indices(full.y, holdout_fraction, torch.Generator().manual_seed(seed))
    if hold_idx.numel() == 0 or train_idx.numel() < 2:
        raise BackdoorLabError(f"--data has {len(full)} images: too few to hold out {holdout_fraction:g} of them; give more data")
    train_set, holdout = full.subset(train_idx, name="train"), full.subset(hold_idx, name="holdout")
    torch.manual_seed(seed)
    net = build_model(ModelSpec(model, full.num_classes, full.shape))
    t0 = time.perf_counter()
    res = trainer.train(net, train_set, clean=holdout, truth=truth[train_idx] if truth is not None else None)
    seconds = time.perf_counter() - t0
    isolated = train_idx[res.isolated_indices]
    d = res.details
    result: dict[str, Any] = {
        "method": method, "model": model, "isolated_indices": isolated.tolist(), "num_isolated": int(isolated.numel()),
        "clean_accuracy": evaluate(res.model, holdout), "train_size": len(train_set), "holdout_size": len(holdout),
        "seconds": round(seconds, 3), "phases": d.get("phases", {}),
    }
    if truth is not None:
        result["isolation_precision"] = float(truth[isolated].float().mean())
        result["num_poisoned"] = int(truth.sum())
    written: dict[str, str] = {}
    if export is not None:
        written["torchscript"] = str(export_torchscript(res.model, export))
    if weights is not None:
        written["weights"] = str(save_model(res.model, weights))
    traces = d.get("loss_traces")
    if figures is not None and isinstance(traces, torch.Tensor) and traces.numel():
        from backdoorlab.plots_abl import loss_traces

        known = truth is not None
        groups = truth[train_idx] if known else torch.isin(torch.arange(len(train_set)), res.isolated_indices)
        written["loss_traces"] = _write_figure(figures, "loss_traces.png", loss_traces(
            traces, groups, gamma=getattr(trainer, "gamma", None),
            labels=("clean samples", "poisoned samples") if known else ("kept samples", "isolated samples"),
            title=f"{trainer.describe()} on {Path(data).name}"))
    result["written"] = written
    if as_json:
        _print_json(result)
        return
    t = Table(title=f"{trainer.describe()}: {len(train_set)} training images, {len(holdout)} held out")
    cols = ["phase", "holdout_accuracy", "seconds"] + (["isolation_precision"] if truth is not None else [])
    for c in cols:
        t.add_column(c.replace("_", " "), justify="right")
    for phase, m in result["phases"].items():
        t.add_row(phase, *(_fmt(m[c]) if c in m else "-" for c in cols[1:]))
    out.print(t)
    msg = f"isolated {result['num_isolated']} samples; clean accuracy on the held-out split {result['clean_accuracy']:.4f}"
    if truth is not None:
        msg += f"; isolation precision {result['isolation_precision']:.4f}"
    out.print(msg + f"; {seconds:.1f} s")
    for kind, v in written.items():
        out.print(f"wrote {kind}: {v}")


from backdoorlab import cli_grid  # noqa: E402,F401  (registers `bench` and `report`)


def main() -> None:
    """Entry point of the ``backdoorlab`` script."""
    from backdoorlab.runtime import tune_allocator

    tune_allocator()
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; nothing half-written was kept")
        sys.exit(130)
