"""ABL's isolation scoring rules compared offline on saved loss passes.

``bench_cifar_full.py isolation ... --save-passes F`` writes every per-sample loss pass of ABL's
isolation phase (``losses`` (P, N), ``epochs`` (P,), ``labels`` (N,), ``is_poison`` (N,)). This script
scores the samples by each rule on the passes up to the end of each epoch and reports, with the
ground truth (for the comparison only), the precision of the lowest ``--ratio`` (ABL's isolated
share), the poison recall within the lowest 5 / 10 / 20% and the AUROC. Pick a rule on one seed's
file and report it on another's (``--files A B``: the first calibrates, the rest report).

    python benchmarks/isolation_rules.py --files /tmp/passes_s0.safetensors /tmp/passes_s1.safetensors

Rules (lower = more likely poisoned; the first epoch is burn-in, as in ABL's ``_isolation_score``):
``last`` (the paper's), ``mean`` / ``median`` of the losses, ``logmean`` (mean log loss),
``rank_mean`` / ``rank_median`` (each pass turned into ranks first, so a pass where one class is
favoured moves its samples by ranks, not by the size of its losses), and ``*_cls`` (each pass's log
loss minus its class's median first: a shift of a whole class's losses cancels).
"""

from __future__ import annotations

import argparse
import json

import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score


def class_centred(lg: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(P, N) log losses minus, per pass, their class's median (labels as given)."""
    out = torch.empty_like(lg)
    for c in labels.unique():
        m = labels == c
        out[:, m] = lg[:, m] - lg[:, m].median(1, keepdim=True).values
    return out


def ranks(x: torch.Tensor) -> torch.Tensor:
    """(P, N) -> each row's ranks in [0, 1) (ties by index)."""
    r = torch.empty_like(x)
    idx = torch.argsort(x, dim=1, stable=True)
    r.scatter_(1, idx, torch.arange(x.shape[1], dtype=x.dtype).expand_as(x).contiguous())
    return r / x.shape[1]


def rules(losses: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    lg = losses.clamp_min(1e-12).log()
    cls, rk = class_centred(lg, labels), ranks(losses)
    return {"last": losses[-1], "mean": losses.mean(0), "median": losses.median(0).values,
            "logmean": lg.mean(0), "rank_mean": rk.mean(0), "rank_median": rk.median(0).values,
            "logmean_cls": cls.mean(0), "median_cls": cls.median(0).values,
            "rank_median_cls": ranks(cls).median(0).values}


def measure(score: torch.Tensor, truth: torch.Tensor, ratio: float) -> dict[str, float]:
    order = torch.argsort(score, stable=True)
    n = score.numel()
    out = {"precision": float(truth[order[: int(round(ratio * n))]].float().mean())}
    for q in (0.05, 0.1, 0.2):
        out[f"recall_{q}"] = float(truth[order[: int(round(q * n))]].float().sum() / truth.sum())
    out["auroc"] = float(roc_auc_score(truth.numpy(), -score.numpy()))
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", nargs="+", required=True)
    ap.add_argument("--ratio", type=float, default=0.01, help="ABL's isolated share")
    ap.add_argument("--json", help="write the table as JSON here")
    args = ap.parse_args()
    table = {}
    for f in args.files:
        t = load_file(f)
        losses, epochs, labels, truth = t["losses"], t["epochs"], t["labels"], t["is_poison"].bool()
        print(f"== {f}: {losses.shape[0]} passes, {int(truth.sum())} poisoned of {truth.numel()}")
        last_epoch = int(epochs.max())
        for e in range(2, last_epoch + 1):
            keep = (epochs > 1) & (epochs <= e)
            for name, score in rules(losses[keep], labels).items():
                m = measure(score, truth, args.ratio)
                table.setdefault(f, {}).setdefault(str(e), {})[name] = m
                print(f"   epoch {e}  {name:16s} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(table, fh, indent=1)


if __name__ == "__main__":
    main()
