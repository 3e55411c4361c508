"""``backdoorlab audit`` and ``backdoorlab biasmaps``: is this model backdoored?"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from backdoorlab.cli.common import JsonOpt, handles_errors, out, print_json, setup_logging

_VERDICT = {True: "[bold red]BACKDOOR FOUND[/bold red]", False: "[bold green]no backdoor found[/bold green]"}


@handles_errors
def audit(
    model: Path = typer.Option(..., "--model", help="safetensors weights (backdoorlab's, or with --arch), a torch.export program (.pt2) or TorchScript"),
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
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="a null fitted on clean models of the same "
                                               "data (`backdoorlab calibrate`): calibrated thresholds instead of the MAD rule"),
    every_pair: bool = typer.Option(False, "--every-pair", help="scan all K(K-1) pairs; by default, above a budget "
                                    "(more than 21 classes at the defaults) each target is scanned from a balanced sample of sources"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Is this model backdoored? Reverse-engineer a trigger for every (source, target) pair, flag
    outliers; with --train, find the poisoned training samples and correct their labels."""
    from backdoorlab import api

    setup_logging(verbose)
    res = api.audit(model, data, train=train, arch=arch, pi=pi, images_per_class=images_per_class, statistic=statistic,
                    technique=technique, relabel=relabel, seed=seed, calibration=calibration, every_pair=every_pair)
    folder = res.write(report)
    result = res.to_dict()
    if as_json:
        print_json(result)
        return
    insp = res.inspector
    calibrated = calibration is not None
    out.print(f"{_VERDICT[res.backdoored]}  (statistic {statistic}, max anomaly {res.max_anomaly:.2f}, "
              f"threshold {res.inspection.threshold:g}: {res.inspection.threshold_source})")
    t = Table(title="most suspicious pairs")
    for col in ("source", "target", f"{getattr(insp, 'norm', '')} norm", "z vs clean models" if calibrated else "anomaly index",
                "flagged"):
        t.add_column(col, justify="right")
    for p in result.get("top_pairs", []):
        s, tt = p["source"], p["target"]
        t.add_row(str(s), str(tt), _num(p["norm"], 3), _num(p["pair_z" if calibrated else "anomaly_index"], 2),
                  "yes" if (s, tt) in res.flagged_pairs else "")
    out.print(t)
    if res.cleanse is not None:
        out.print(f"flagged {len(result['flagged_indices'])} training samples (see {folder / 'flagged.csv'})")
    out.print(f"report: {folder}  ({result['seconds']:.1f} s)")


@handles_errors
def calibrate(
    model: List[Path] = typer.Option(..., "--model", help="a clean model of the data (repeatable, 3 or more; any format `audit` takes; "
                                     "best: 10 or more of the suspect's own architecture, docs/populations.md)"),
    data: str = typer.Option(..., "--data", help="clean images, as for `audit` (the same images you will audit with)"),
    out_file: Path = typer.Option(..., "--out", help="the calibration file to write (.safetensors)"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture for plain safetensors weights"),
    pi: float = typer.Option(0.9, "--pi", help="as for `audit` (use the same value when auditing)"),
    images_per_class: Optional[int] = typer.Option(None, "--images-per-class", help="as for `audit` (default: the "
                                                   "inspector's, 100 for pairwise, 10 for neural-cleanse)"),
    every_pair: bool = typer.Option(False, "--every-pair", help="as for `audit`"),
    inspector: str = typer.Option("pairwise", "--inspector", help="pairwise (for `audit --calibration`) or "
                                  "neural-cleanse (its `calibration` setting in YAML and the Python API)"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Fit the pairwise audit's null on clean models of your data: per pair, how small its trigger is
    in clean models, and thresholds from those models (leave-one-out). Then `audit --calibration FILE`.
    With --inspector neural-cleanse: per target, how small Neural Cleanse's mask is in clean models."""
    from backdoorlab import api

    setup_logging(verbose)
    res = api.calibrate(model, data, out_file, arch=arch, pi=pi, images_per_class=images_per_class, seed=seed,
                        every_pair=every_pair, inspector=inspector)
    if as_json:
        print_json(res.to_dict())
        return
    out.print(f"calibration of {res.null.n_models} clean models written to {res.path}: {res.null.describe()} "
              f"({res.seconds:.1f} s)")


@handles_errors
def biasmaps(
    model: Path = typer.Option(..., "--model", help="the suspect: safetensors weights (backdoorlab's, or with --arch), a torch.export program (.pt2) or TorchScript"),
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
    from backdoorlab import api

    setup_logging(verbose)
    res = api.bias_maps(model, data, reference=reference, arch=arch, reference_arch=reference_arch, inputs=tuple(inputs),
                        eps=tuple(eps), iterations=iterations, samples_per_class=samples, pair_samples=pair_samples,
                        threshold=threshold, statistic=statistic, seed=seed)
    folder = res.write(report)
    d = res.to_dict()
    if as_json:
        print_json(d)
        return
    out.print(f"{_VERDICT[res.backdoored]}  (reference: {d.get('reference')}; flagged classes {res.flagged_targets}, "
              f"pairs {res.flagged_pairs})")
    t = Table(title=f"per-class bias-map distance and {d.get('statistic')} statistic")
    for col in ("class", "distance", "statistic", "anomaly index", "flagged"):
        t.add_column(col, justify="right")
    for c, (dist, stat, a) in enumerate(zip(d["class_distance"], d["class_statistic"], d["anomaly_index"])):
        t.add_row(str(c), _num(dist, 3), _num(stat, 3), _num(a, 2), "yes" if c in res.flagged_targets else "")
    out.print(t)
    out.print(f"report: {folder}  ({d['seconds']:.1f} s)")


def _num(v: float | None, digits: int) -> str:
    return "nan" if v is None else f"{v:.{digits}f}"
