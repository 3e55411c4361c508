"""Detectors measured over a population of models, with thresholds calibrated on one half.

A population is a grid (:mod:`backdoorlab.grid`) whose victims vary in architecture, training-set
size, training recipe, seed and attack, with clean models among them (attack ``none``), and whose
defenses include model-level inspectors. For each inspector this module reads, per model, its
score (``max_anomaly``, the largest anomaly index), its own verdict (``backdoored``) and whether it
named the planted target or pair, and reports:

- the ROC curve and AUROC of the score (backdoored vs clean models), TPR at a 5% false-alarm rate;
- the method's own verdict: false alarms on clean models, detection rate, "found" (verdict true and
  the true target or pair named);
- a **calibrated** threshold: fitted on the calibration half only (the models of the first half of
  the seeds), as the smallest score above every clean calibration model's score (no false alarm
  there; a stated null: "clean models of this population"), then applied to the evaluation half.
  Nothing reported for the evaluation half was used to pick its threshold;
- detection per trigger kind / threat model (attack label) and false alarms per architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from backdoorlab import metrics as M
from backdoorlab.errors import BackdoorLabError

FALSE_ALARM = 0.05


@dataclass(frozen=True)
class Model:
    """One model of a population as an inspector saw it."""

    data: str
    arch: str
    attack: str
    seed: int
    score: float
    flagged: bool
    found: bool  # flagged and the planted target (or pair) named; False for clean models

    @property
    def backdoored(self) -> bool:
        return self.attack != "none"


@dataclass(frozen=True)
class InspectorSummary:
    inspector: str
    calibration: list[Model]
    evaluation: list[Model]
    threshold: float  # calibrated on the calibration half
    seeds: tuple[list[int], list[int]]

    def rates(self, models: Sequence[Model], threshold: float | None = None) -> dict[str, float]:
        """Counts and rates on ``models``: with ``threshold`` the calibrated verdict (score >= it), else
        the method's own."""
        clean = [m for m in models if not m.backdoored]
        bad = [m for m in models if m.backdoored]
        flag = (lambda m: m.score >= threshold) if threshold is not None else (lambda m: m.flagged)
        # with a calibrated threshold, "found" still needs the method to name the target
        found = (lambda m: flag(m) and m.found) if threshold is not None else (lambda m: m.found)
        out = {"clean": float(len(clean)), "backdoored": float(len(bad)),
               "false_alarms": float(sum(flag(m) for m in clean)),
               "fpr": _share(sum(flag(m) for m in clean), len(clean)),
               "tpr": _share(sum(flag(m) for m in bad), len(bad)),
               "found": _share(sum(found(m) for m in bad), len(bad))}
        if clean and bad:
            s = torch.tensor([m.score for m in models], dtype=torch.float64)
            t = torch.tensor([m.backdoored for m in models])
            s = torch.nan_to_num(s, nan=-1e9, posinf=1e9, neginf=-1e9)
            out["auroc"] = M.auroc(s, t)
            out["tpr_at_5pct_fpr"] = tpr_at_fpr(s, t, FALSE_ALARM)
        return out


def _share(k: int, n: int) -> float:
    return k / n if n else float("nan")


def tpr_at_fpr(scores: torch.Tensor, truth: torch.Tensor, fpr: float) -> float:
    """The largest TPR whose threshold keeps the false-alarm rate at or below ``fpr`` (flag: score >= t)."""
    clean = scores[~truth].sort(descending=True).values
    allowed = int(math.floor(fpr * clean.numel() + 1e-9))  # false alarms allowed
    # the threshold sits just above the (allowed + 1)-th largest clean score
    t = clean[allowed].item() if allowed < clean.numel() else -float("inf")
    return float((scores[truth] > t).float().mean())


def calibrated_threshold(clean_scores: Sequence[float]) -> float:
    """The smallest threshold above every clean calibration score (no false alarm on the calibration
    half); +inf when there is no finite clean score."""
    finite = [s for s in clean_scores if math.isfinite(s)]
    if not finite:
        return float("inf")
    top = max(finite)
    return math.nextafter(top, math.inf)


def models_of(rows: Sequence[Any], inspector: str) -> list[Model]:
    """The models an inspector saw, from report rows (``report.Row``: one per cell, not aggregated)."""
    out = []
    for r in rows:
        if r.defense != inspector or r.status != "done" or "max_anomaly" not in r.metrics:
            continue
        m = r.metrics
        backdoored = r.attack != "none"
        found = bool(m.get("backdoored", 0.0)) and (m.get("pair_found", m.get("target_found", 0.0)) >= 0.5) and backdoored
        score = m["max_anomaly"]
        out.append(Model(r.data, r.model, r.attack, int(r.seed), float(score) if score is not None else math.nan,
                         bool(m.get("backdoored", 0.0)), found))
    return out


def summarise(rows: Sequence[Any]) -> list[InspectorSummary]:
    """One summary per inspector whose population has clean and backdoored models in both halves."""
    inspectors = sorted({r.defense for r in rows if r.family == "inspector"})
    out = []
    for name in inspectors:
        models = models_of(rows, name)
        seeds = sorted({m.seed for m in models})
        if len(seeds) < 2:
            continue
        cal_seeds, eval_seeds = seeds[: len(seeds) // 2], seeds[len(seeds) // 2:]
        cal = [m for m in models if m.seed in cal_seeds]
        ev = [m for m in models if m.seed in eval_seeds]
        if not all(any(m.backdoored == b for m in part) for part in (cal, ev) for b in (True, False)):
            continue
        thr = calibrated_threshold([m.score for m in cal if not m.backdoored])
        out.append(InspectorSummary(name, cal, ev, thr, (cal_seeds, eval_seeds)))
    return out


def check_population(spec: Any) -> None:
    """A population grid must hold clean and backdoored models and at least one inspector: one
    clear error otherwise (a ROC is undefined without both kinds)."""
    attacks = list(spec.attacks)
    has_clean = any(a is None or (isinstance(a, dict) and a.get("name") in (None, "none")) for a in attacks)
    has_bad = any(isinstance(a, dict) and a.get("name") not in (None, "none") for a in attacks)
    if not has_clean or not has_bad:
        missing = "clean models (an attack entry `null`)" if not has_clean else "backdoored models (an attack)"
        raise BackdoorLabError(f"population {spec.name!r} has no {missing}: a detector's ROC needs both; "
                               "add the missing entries to `attacks:`")
    if len(set(spec.seeds)) < 2:
        raise BackdoorLabError(f"population {spec.name!r} has {len(set(spec.seeds))} seed(s): calibration uses the first "
                               "half of the seeds and reports on the other half; give at least 2 seeds")
    from backdoorlab.defenses import DEFENSES

    if not any(d.get("name") in DEFENSES and DEFENSES.get(d["name"]).factory.family == "inspector" for d in spec.defenses):
        raise BackdoorLabError(f"population {spec.name!r} runs no model-level inspector; add one to `defenses:` "
                               "(e.g. pairwise, neural-cleanse, bias-maps)")


def roc_figure(summaries: Sequence[InspectorSummary]) -> bytes | None:
    """ROC curves of every inspector's score on the evaluation half, with the calibrated operating point."""
    if not summaries:
        return None
    from backdoorlab.plots import _plt, _to_png

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for s in summaries:
        sc = torch.tensor([m.score for m in s.evaluation], dtype=torch.float64)
        sc = torch.nan_to_num(sc, nan=-1e9, posinf=1e9, neginf=-1e9)
        t = torch.tensor([m.backdoored for m in s.evaluation])
        fpr, tpr, _ = M.roc_curve(sc, t)
        r = s.rates(s.evaluation, s.threshold)
        line, = ax.plot(fpr.numpy(), tpr.numpy(), drawstyle="steps-post",
                        label=f"{s.inspector} (AUROC {r.get('auroc', float('nan')):.2f})")
        ax.plot([r["fpr"]], [r["tpr"]], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false-alarm rate (clean models flagged)")
    ax.set_ylabel("detection rate (backdoored models flagged)")
    ax.set_title("evaluation half; dot: threshold calibrated on the other half", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _to_png(fig)


def distributions(rows: Sequence[Any]) -> list[tuple[str, str, list[str], list[list[str]], str]]:
    """Input-level (run-time detectors: FRR / FAR) and sample-level (cleansers: TPR / FPR) results over
    the population's backdoored models, per defense and attack label: median and range over models
    (every seed: these methods have no population-fitted threshold)."""
    out = []
    for fam, keys, tid, title in (
            ("detector", ("frr", "far"), "population-inputs", "Run-time detectors over the backdoored models (FRR / FAR)"),
            ("cleanser", ("tpr", "fpr"), "population-samples", "Training-set cleansers over the backdoored models (TPR / FPR)")):
        got: dict[tuple[str, str], list[dict[str, float]]] = {}
        for r in rows:
            if r.family == fam and r.status == "done" and r.attack != "none" and all(k in r.metrics for k in keys):
                got.setdefault((r.defense, r.attack), []).append(r.metrics)
        body = []
        for (d, a), ms in sorted(got.items()):
            cells = []
            for k in keys:
                v = torch.tensor([m[k] for m in ms], dtype=torch.float64)
                cells.append(f"{float(v.median()):.3f} ({float(v.min()):.3f}-{float(v.max()):.3f})")
            body.append([d, a, str(len(ms)), *cells])
        if body:
            out.append((tid, title, ["defense", "attack", "models", *(f"{k.upper()} median (range)" for k in keys)], body,
                        "Every seed; each method at its own preset threshold."))
    return out


def tables(rows: Sequence[Any]) -> list[tuple[str, str, list[str], list[list[str]], str]]:
    """(id, title, columns, rows, note) of the population tables; empty when no inspector has a population."""
    sums = summarise(rows)
    if not sums:
        return []
    f = lambda v: "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    main = []
    for s in sums:
        own, cal = s.rates(s.evaluation), s.rates(s.evaluation, s.threshold)
        main.append([s.inspector, f"{int(own['clean'])} / {int(own['backdoored'])}", f(own.get("auroc")),
                     f(own.get("tpr_at_5pct_fpr")), f"{int(own['false_alarms'])}", f(own["tpr"]), f(own["found"]),
                     f(s.threshold), f"{int(cal['false_alarms'])}", f(cal["tpr"]), f(cal["found"])])
    out = [("population", "Model-level detectors over a population (evaluation half)",
            ["inspector", "clean / backdoored", "AUROC", "TPR @ 5% FPR", "false alarms (own rule)", "TPR (own)",
             "found (own)", "calibrated threshold", "false alarms (calibrated)", "TPR (calibrated)", "found (calibrated)"],
            main, f"Calibration half: seeds {sums[0].seeds[0]}; evaluation half: seeds {sums[0].seeds[1]}. Score: the "
                  "largest anomaly index. The calibrated threshold is the smallest score above every clean model of the "
                  "calibration half. 'found': verdict true and the planted target (or pair) named.")]
    per = []
    for s in sums:
        for attack in sorted({m.attack for m in s.evaluation if m.backdoored}):
            r = s.rates([m for m in s.evaluation if m.attack == attack or not m.backdoored], s.threshold)
            per.append([s.inspector, attack, f"{int(r['backdoored'])}", f(r["tpr"]), f(r["found"])])
    out.append(("population-triggers", "Detection per trigger kind and threat model (evaluation half, calibrated threshold)",
                ["inspector", "attack", "models", "TPR", "found"], per, ""))
    arch = []
    for s in sums:
        for a in sorted({m.arch for m in s.evaluation}):
            ms = [m for m in s.evaluation if m.arch == a]
            own, cal = s.rates(ms), s.rates(ms, s.threshold)
            arch.append([s.inspector, a, f"{int(own['clean'])}", f"{int(own['false_alarms'])}", f"{int(cal['false_alarms'])}",
                         f(cal["tpr"])])
    out.append(("population-architectures", "False alarms per architecture (evaluation half)",
                ["inspector", "architecture", "clean models", "false alarms (own rule)", "false alarms (calibrated)",
                 "TPR (calibrated)"], arch, ""))
    return out + distributions(rows)
