"""``backdoorlab cleanse``: flag the poisoned samples of a training set."""

from __future__ import annotations

import io
from pathlib import Path
from typing import List, Optional

import typer

from backdoorlab.cli.common import JsonOpt, err, fmt, handles_errors, method_params, out, print_json, setup_logging
from backdoorlab.errors import BackdoorLabError


@handles_errors
def cleanse(
    method: str = typer.Option(..., "--method", help="a cleanser: activation-clustering, spectral-signatures, spectre, "
                               "pattern-subtraction (see `backdoorlab list`)"),
    train: str = typer.Option(..., "--train", help="the training set to cleanse (.npz with x, y and optionally is_poison "
                              "= ground truth for TPR / FPR / AUROC; folder or data set name)"),
    model: Optional[Path] = typer.Option(None, "--model", help="the model trained on TRAIN (safetensors, .pt2 or TorchScript); "
                                         "without it a model is trained on TRAIN (--train-arch, --epochs)"),
    clean: Optional[str] = typer.Option(None, "--clean", help="the defender's clean images (pattern-subtraction needs them; "
                                        "activation-clustering, spectral-signatures and spectre use them when given)"),
    param: List[str] = typer.Option([], "--param", "-p", help="a method parameter, e.g. -p analysis=relative-size (repeatable)"),
    scores: Optional[Path] = typer.Option(None, "--scores", help="write every sample's score, flag and corrected label here "
                                          "(.npz, or .csv: index,label,corrected_label,score,flagged)"),
    arch: Optional[str] = typer.Option(None, "--arch", help="architecture of plain safetensors weights without a spec"),
    train_arch: str = typer.Option("cnn", "--train-arch", help="architecture trained on TRAIN when no --model is given"),
    epochs: int = typer.Option(4, "--epochs", min=1, help="epochs of that training"),
    seed: int = typer.Option(0, "--seed", min=0),
    as_json: bool = JsonOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log to stderr"),
) -> None:
    """Find the poisoned samples of a training set with a cleanser: activation clustering, spectral
    signatures, SPECTRE (on the penultimate activations of the model trained on it) or pattern
    subtraction (seed 000). Without --model, a model is trained on TRAIN first (said on stderr)."""
    from backdoorlab import api

    setup_logging(verbose)
    cl = api.make_defense(method, method_params(param), family="cleanser", where="--param", option="--method",
                          defaults={"seed": seed})
    if scores is not None and scores.suffix.lower() not in (".npz", ".csv"):
        raise BackdoorLabError(f"--scores {scores}: name the file .npz or .csv")
    if model is None:
        err.print(f"no --model given: training a {train_arch} on {train} ({epochs} epochs, seed {seed}) to read its activations")
    res = api.cleanse(train, model, method=cl, clean=clean, seed=seed, arch=arch, train_arch=train_arch,
                      train_epochs=epochs)
    if model is None and res.trained_model is not None:
        err.print(f"trained in {res.trained_model['seconds']:.1f} s (training accuracy {res.trained_model['train_accuracy']:.4f})")
    d = res.to_dict()
    d["method"] = method
    if scores is not None:
        _write_scores(res, scores)
    d["scores_file"] = str(scores) if scores is not None else None
    if as_json:
        d.pop("corrected_labels", None)  # per flagged sample; the scores file has them
        print_json(d)
        return
    n = len(res.data)
    line = f"{method}: flagged {d['num_flagged']} of {n} training samples ({d['seconds']:.1f} s)"
    if "tpr" in d:
        line += "; " + ", ".join(f"{k} {fmt(d[k])}" for k in ("tpr", "fpr", "auroc") if d.get(k) is not None)
    out.print(line)
    if scores is not None:
        out.print(f"wrote scores: {scores}")


def _write_scores(res, path: Path) -> None:
    import numpy as np

    from backdoorlab.atomic import atomic_write_bytes, atomic_write_text

    r, y = res.result, res.data.y
    if path.suffix.lower() == ".npz":
        buf = io.BytesIO()
        np.savez(buf, scores=r.scores.numpy(), flagged=r.flagged.numpy(), corrected_labels=r.corrected_labels.numpy(),
                 labels=y.numpy())
        atomic_write_bytes(path, buf.getvalue())
        return
    lines = ["index,label,corrected_label,score,flagged"] + [
        f"{i},{int(a)},{int(b)},{float(s):.6g},{int(bool(f))}"
        for i, (a, b, s, f) in enumerate(zip(y.tolist(), r.corrected_labels.tolist(), r.scores.tolist(), r.flagged.tolist()))]
    atomic_write_text(path, "\n".join(lines) + "\n")
