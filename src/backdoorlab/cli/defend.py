"""``backdoorlab repair``, ``guard`` and ``train-robust``: defend a model, its inputs, its training."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from backdoorlab.cli.common import (
    JsonOpt, fmt, handles_errors, method_params, out, print_json, print_written, setup_logging, write_figures,
)
from backdoorlab.errors import BackdoorLabError


@handles_errors
def repair(
    model: Path = typer.Option(..., "--model", help="model file: backdoorlab safetensors, a torch.export program (.pt2) or TorchScript"),
    clean: str = typer.Option(..., "--clean", help="the defender's clean images (npz, folder or data set name)"),
    method: str = typer.Option("fine-pruning", "--method", help="a repairer: fine-pruning, pruning, fine-tuning, nad, anp, "
                               "i-bau, clp (data-free), nc-unlearning; every one works on foreign models (TorchScript "
                               ".pt, torch.export .pt2) as on our architectures"),
    eval_: Optional[str] = typer.Option(None, "--eval", help="clean test images for CA along the curve (an npz's test part if it has one)"),
    triggered: Optional[str] = typer.Option(None, "--triggered", help="triggered images labelled with the attacker's target, for ASR"),
    param: List[str] = typer.Option([], "--param", "-p", help="a method parameter, e.g. -p tolerance=0.01 (repeatable)"),
    clean_size: Optional[int] = typer.Option(None, "--clean-size", min=1, help="use a stratified subsample of this many clean images"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture of plain safetensors weights without a spec"),
    out_path: Optional[Path] = typer.Option(None, "--out", help="write the repaired model here: .pt2 (torch.export, the "
                                            "default), .pt (TorchScript) or .safetensors (registered architectures)"),
    figures: Optional[Path] = typer.Option(None, "--figures", help="write the CA/ASR vs pruned fraction figure into this folder"),
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log each step to stderr"),
) -> None:
    """Repair a model on clean data (fine-tuning, fine-pruning, NAD, ANP, i-BAU, CLP, NC unlearning); report CA/ASR."""
    from backdoorlab import api

    setup_logging(verbose)
    defense = api.make_defense(method, method_params(param), family="repairer", where="--param", option="--method")
    if out_path is not None:
        _check_model_name(out_path, "--out")
        _check_out_format(model, out_path)
    res = api.repair(model, clean, method=defense, eval=eval_, triggered=triggered, clean_size=clean_size, arch=arch)
    written: dict[str, str] = {}
    if out_path is not None:
        written["model"] = str(res.save_model(out_path))
    written.update(write_figures(res, figures, "curve"))
    summary = {**res.to_dict(), "written": written}
    if as_json:
        print_json(summary)
        return
    t = Table(title=f"{method}: curve ({summary.get('layer') or '-'}, {res.clean_size} clean images)")
    cols = [k for k in ("pruned_fraction", "finetuned", "holdout_accuracy", "clean_accuracy", "attack_success_rate")
            if any(k in r for r in res.curve)]
    for c in cols:
        t.add_column(c.replace("_", " "), justify="right")
    for r in res.curve:
        t.add_row(*(fmt(r[c]) if c in r else "-" for c in cols))
    out.print(t)
    keys = ("clean_accuracy", "attack_success_rate", "holdout_accuracy")
    before = ", ".join(f"{k} {fmt(summary[k + '_before'])}" for k in keys if summary.get(k + "_before") is not None)
    after = ", ".join(f"{k} {fmt(summary[k])}" for k in keys if summary.get(k) is not None)
    out.print(f"pruned fraction {fmt(float(summary.get('pruned_fraction') or 0.0))}; before: {before}; after: {after}; "
              f"{res.seconds:.1f} s")
    print_written(written)


@handles_errors
def guard(
    model: Path = typer.Option(..., "--model", help="model file: backdoorlab safetensors, a torch.export program (.pt2) or TorchScript"),
    clean: str = typer.Option(..., "--clean", help="clean held-out images that set the threshold (npz, folder or data set name)"),
    inputs: str = typer.Option(..., "--inputs", help="images to screen: npz (y optional; is_poison = ground truth), folder or name"),
    method: str = typer.Option("strip", "--method", help="an input detector: strip, scale-up"),
    samples: Optional[int] = typer.Option(None, "--samples", min=2, help="superimposed copies per input (N; STRIP, default 20)"),
    frr: Optional[float] = typer.Option(None, "--frr", help="preset false rejection rate on clean inputs (default 0.01)"),
    superimpose: Optional[str] = typer.Option(None, "--superimpose", help="STRIP: sum (x+h saturated at 1, the default), add (x+h unclipped, the paper's float code) or average (ART's 50/50)"),
    threshold_rule: Optional[str] = typer.Option(None, "--threshold-rule", help="STRIP: quantile of the clean entropies (the default), or normal (the paper's fit)"),
    param: List[str] = typer.Option([], "--param", "-p", help="another detector parameter, e.g. -p batch_size=256 (repeatable)"),
    clean_size: Optional[int] = typer.Option(None, "--clean-size", min=1, help="use a stratified subsample of this many clean images"),
    seed: int = typer.Option(0, "--seed", min=0, help="seed of the detector's draws (STRIP: the clean images blended with each input)"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture of plain safetensors weights without a spec"),
    save_threshold: Optional[Path] = typer.Option(None, "--save-threshold", help="write the fitted detector (threshold and "
                                                  "state, safetensors + JSON metadata) here, for backdoorlab serve --threshold"),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="write index,prediction,score,flagged per input here"),
    figures: Optional[Path] = typer.Option(None, "--figures", help="write the entropy histogram into this folder"),
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log to stderr"),
) -> None:
    """Screen inputs with an input detector (STRIP by default): flag trojaned inputs; the guarded
    prediction is class K for them."""
    from backdoorlab import api
    from backdoorlab.atomic import atomic_write_text

    setup_logging(verbose)
    detector = detector_from_options(method, samples=samples, frr=frr, superimpose=superimpose,
                                     threshold_rule=threshold_rule, seed=seed, params=method_params(param))
    if save_threshold is not None and save_threshold.suffix != ".safetensors":
        raise BackdoorLabError(f"--save-threshold {save_threshold}: name the file .safetensors")
    res = api.guard(model, clean, inputs, method=detector, clean_size=clean_size, arch=arch, save_threshold=save_threshold)
    result = res.to_dict()
    written: dict[str, str] = {}
    if save_threshold is not None:
        written["threshold"] = str(save_threshold)
    if csv_path is not None:
        atomic_write_text(csv_path, res.csv())
        written["csv"] = str(csv_path)
    written.update(write_figures(res, figures, "histogram"))
    result["written"] = written
    if as_json:
        print_json(result)
        return
    n, k = result["num_inputs"], result["trojaned_class"]
    boundary = (f"entropy boundary {result['entropy_threshold']:.4f} bits" if result.get("entropy_threshold") is not None
                else f"score threshold {result['threshold']:.4f}")
    msg = (f"{result['num_flagged']} of {n} inputs flagged as trojaned (class {k}); {boundary} at preset FRR "
           f"{result.get('frr_preset', frr if frr is not None else 0.01)}; "
           f"{result['inputs_per_second']:.0f} inputs/s")
    if res.truth is not None:
        msg += f"; FRR {result['frr']:.4f}, FAR {result['far']:.4f}, AUROC {result['auroc']:.4f}"
    out.print(msg)
    print_written(written)


@handles_errors
def train_robust(
    data: str = typer.Option(..., "--data", help="the (possibly poisoned) training set: .npz (x, y; is_poison, when present, "
                                                 "is ground truth used only to report), image folder or data set name"),
    model: str = typer.Option("cnn", "--model", help="architecture to train (see `backdoorlab list`)"),
    method: str = typer.Option("abl", "--method", help="a robust trainer: abl"),
    export: Optional[Path] = typer.Option(None, "--export", help="write the trained model here: .pt2 (torch.export, the "
                                          "default) or .pt (TorchScript, deprecated upstream)"),
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
    from backdoorlab import api

    setup_logging(verbose)
    trainer = api.make_defense(method, method_params(param), family="robust-trainer", where="--param", option="--method",
                               defaults={"seed": seed})
    if export is not None:
        _check_model_name(export, "--export", safetensors=False)
    if weights is not None and weights.suffix != ".safetensors":
        raise BackdoorLabError(f"--weights {weights}: use a .safetensors name")
    res = api.train_robust(data, model=model, method=trainer, holdout_fraction=holdout_fraction, seed=seed)
    written: dict[str, str] = {}
    if export is not None:
        written["torchscript" if export.suffix != ".pt2" else "program"] = str(res.export(export))
    if weights is not None:
        written["weights"] = str(res.save_weights(weights))
    written.update(write_figures(res, figures, "loss_traces"))
    result = {**res.to_dict(), "written": written}
    if as_json:
        print_json(result)
        return
    t = Table(title=f"{res.trainer.describe()}: {result['train_size']} training images, {result['holdout_size']} held out")
    cols = ["phase", "holdout_accuracy", "seconds"]
    for c in cols:
        t.add_column(c.replace("_", " "), justify="right")
    for phase, m in result["phases"].items():
        t.add_row(phase, *(fmt(m[c]) if m.get(c) is not None else "-" for c in cols[1:]))
    out.print(t)
    msg = f"isolated {result['num_isolated']} samples; clean accuracy on the held-out split {result['clean_accuracy']:.4f}"
    if result.get("isolation_precision") is not None:
        msg += f"; isolation precision {result['isolation_precision']:.4f}"
    out.print(msg + f"; {res.seconds:.1f} s")
    print_written(written)


_STRIP_ONLY = ("samples", "superimpose", "threshold_rule")


def detector_from_options(method: str, *, params: dict, seed: int, **options):
    """An input detector built from the command's options: those given (not None) go to the
    method; STRIP-only options given to another method, or any option the method lacks, are one
    error naming the method's parameters. ``seed`` fills the method's seed when it has one."""
    from backdoorlab import api
    from backdoorlab.defenses import DEFENSES

    given = {k: v for k, v in options.items() if v is not None}
    accepted = DEFENSES.parameters(method) if method in DEFENSES else []
    for k in given:
        if k not in accepted and method in DEFENSES:
            what = "a STRIP option" if k in _STRIP_ONLY else "an option"
            raise BackdoorLabError(f"--{k.replace('_', '-')} is {what} that --method {method} does not take; "
                                   f"its parameters: {', '.join(accepted) or '(none)'} (set them with -p NAME=VALUE)")
    return api.make_defense(method, {**given, **params}, family="detector", where="--param", option="--method",
                            defaults={"seed": seed})


def _check_model_name(path: Path, option: str, safetensors: bool = True) -> None:
    """Refuse a model file name whose format is unknown, before anything runs."""
    from backdoorlab.models.io import EXPORT_SUFFIXES

    kinds = {k for k, v in EXPORT_SUFFIXES.items() if safetensors or v != "safetensors"}
    if path.suffix.lower() not in kinds:
        names = ".pt2 (torch.export program, the default), .pt (TorchScript)" + (" or .safetensors" if safetensors else "")
        raise BackdoorLabError(f"{option} {path}: name the file {names}")
    if path.is_dir():
        raise BackdoorLabError(f"{option} {path} is a folder; give a file name")


def _check_out_format(model: Path, out_path: Path) -> None:
    """Refuse, before the repair, an output format the input model cannot be written in."""
    from backdoorlab.validate import model_format

    fmt = model_format(model)
    suffix = out_path.suffix.lower()
    if suffix == ".safetensors" and fmt in ("torchscript", "export"):
        raise BackdoorLabError(f"--out {out_path}: a {'TorchScript' if fmt == 'torchscript' else 'torch.export'} model "
                               "cannot be written as backdoorlab safetensors; use a .pt2 or .pt name")
    if suffix == ".pt2" and fmt == "torchscript":
        raise BackdoorLabError(f"--out {out_path}: torch.export cannot capture a TorchScript model; use a .pt name "
                               "(TorchScript again)")
