"""Pairwise-audit statistics over a model population (issue 22): which per-model score separates
backdoored from clean models on models the threshold was not fitted on.

Reads a population already run by ``backdoorlab population configs/populations/mnist.yaml`` (the
victims' weights and configs from the store), runs the pairwise scan (50 clean held-out images per
class, the cells' setting) once per model (cached in ``--cache``), and compares scores:

- ``mad``: the inspector's own rule, the largest MAD anomaly index of the log-norm residuals (log
  norm minus its row and column medians) within the model, at its fixed threshold (3) and at a
  threshold fitted on the calibration half;
- ``pair-null``: the library's calibrated verdict (:mod:`backdoorlab.defenses._pair_null`, what
  ``backdoorlab calibrate`` fits): each pair's and each target's residual as a z-score against the
  same pair (target) in the calibration half's clean models, at its leave-one-out thresholds, and
  per trigger kind and architecture;
- ``--fuse neural-cleanse,bias-maps``: the pair null OR'ed with the population run's other
  inspectors, each at a threshold fitted on the calibration half's clean models.
- ``--nc IMAGES``: instead of the pairwise scan, Neural Cleanse once per model (its per-target mask
  norms, cached) and its model scores: the paper's MAD rule, the MAD of log norms, a per-target null
  (:func:`nc_rows`), and score-level fusions (:func:`sum_rows`: the sum of the channels' scores in
  units of their thresholds, with ``--fuse`` the population's other inspectors as channels too).

Calibration half: seed 0's models (and ``--extra-clean`` grids' clean models); evaluation half: seed 1's. Every threshold is fitted on the
calibration half only (the smallest score above every clean calibration model) and reported on the
evaluation half. Usage::

    BACKDOORLAB_DATA=../shared/data BACKDOORLAB_HOME=STORE python benchmarks/bench_population.py [--grid population-mnist]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

CAL_SEEDS: set[int] = {0}  # the calibration half's seeds (seed 0; ``--extra-clean`` adds its grid's seeds)


def _cal(m: dict) -> bool:
    """Is ``m`` in the calibration half?"""
    return m["seed"] in CAL_SEEDS


def _population_rows(grid: str, config: Path | None, limit: int | None = None, defenses: tuple[str, ...] = ("none",)):
    """The population's finished cells of ``defenses`` (``none``: the trained models), only the
    YAML's current ones with ``config``, and their records."""
    from backdoorlab.cellstore import CellStore
    from backdoorlab.store import Store, default_home

    cs = CellStore(Store(default_home()))
    rows = [r for r in cs.cells(grid) if r.defense in defenses and r.status == "done"]
    if config is not None:  # only the cells of the grid as it is now (a store keeps cells of earlier versions)
        from backdoorlab.grid import load_grid

        ids = {c.cell_id for c in load_grid(config).cells}
        rows = [r for r in rows if r.cell_id in ids]
    rows = rows[:limit]
    return rows, cs.records(rows)


def _scan_each(grid: str, cache: Path, tag: str, scan, limit: int | None, config: Path | None) -> list[dict]:
    """``scan(model, holdout) -> dict of tensors`` once per population model, cached in ``cache``
    under the cell id and ``tag``; the models with their truth and the scan's tensors."""
    from backdoorlab.config import ExperimentConfig
    from backdoorlab.experiment import prepare
    from backdoorlab.models import load_model

    cache.mkdir(parents=True, exist_ok=True)
    rows, recs = _population_rows(grid, config, limit)
    out = []
    for i, r in enumerate(rows):
        rec = recs[r.cell_id]
        f = cache / f"{r.cell_id[:16]}{tag}.pt"
        if not f.is_file():
            cfg = ExperimentConfig.model_validate(rec.config)
            prep = prepare(cfg)
            model = load_model(Path(rec.run_dir) / "weights.safetensors", num_classes=prep.train_set.num_classes,
                               input_shape=prep.train_set.shape)
            t0 = time.perf_counter()
            got = scan(model, prep.splits.holdout)
            tmp = f.with_suffix(".tmp")
            torch.save(got, tmp)
            tmp.replace(f)
            print(f"[{i + 1}/{len(rows)}] {r.data}/{r.model}/{r.attack}/seed{r.seed}: {time.perf_counter() - t0:.1f} s",
                  flush=True)
        d = torch.load(f)
        a = rec.config.get("attack") or {}
        out.append({"data": r.data, "model": r.model, "attack": r.attack, "seed": r.seed, **d,
                    "weights": Path(rec.run_dir) / "weights.safetensors", "id": r.cell_id, "target": a.get("target"),
                    "source": a.get("source"), "mode": a.get("mode"), "asr": rec.metrics.get("attack_success_rate")})
    return out


def scan_population(grid: str, cache: Path, params: dict | None = None, limit: int | None = None,
                    config: Path | None = None) -> list[dict]:
    """The pairwise scan (50 clean held-out images per class, the cells' setting) of every model."""
    from backdoorlab.defenses.common import images_per_class
    from backdoorlab.defenses.pairwise import PairwiseTriggerInspector

    insp = PairwiseTriggerInspector(images_per_class=50, **(params or {}))

    def scan(model, holdout) -> dict:
        est = insp.estimate(model, holdout)
        xs = images_per_class(holdout, insp.images_per_class, torch.Generator().manual_seed(insp.seed))
        return {"norms": est["norms"], "reached": est["reached"], "patterns": est["patterns"].half(),
                "images": xs.mul(255).round().to(torch.uint8)}

    tag = "".join(f"-{k}={v}" for k, v in sorted((params or {}).items()))
    out = _scan_each(grid, cache, tag, scan, limit, config)
    for m in out:
        m.setdefault("patterns", None)
        m.setdefault("images", None)
        m["precision"] = insp.resolution
    return out


def load_references(models: list[dict]) -> list[tuple[str, torch.nn.Module]]:
    """The calibration half's clean models, as reference models (the defender's own clean models)."""
    from backdoorlab.models import load_model

    refs = []
    for m in models:
        if _cal(m) and m["attack"] == "none":
            net = load_model(m["weights"], num_classes=m["norms"].shape[0], input_shape=tuple(m["images"].shape[2:]))
            refs.append((m["id"], net.eval()))
    return refs


@torch.no_grad()
def add_transfer(models: list[dict], cache: Path, chunk: int = 2048) -> None:
    """``m["transfer"]`` (K, K): over the reference models (the model itself left out), the mean
    fraction of the source class's clean images that the suspect's pattern for (s, t) sends to t;
    ``m["locality"]`` (K, K): the share of the pattern's L1 mass inside its best 5x5 window."""
    refs = load_references(models)
    for i, m in enumerate(models):
        f = cache / f"transfer-{m['id'][:16]}.pt"
        p = m["patterns"].float()
        k = p.shape[0]
        w = torch.nn.functional.avg_pool2d(p.abs().sum(2).flatten(0, 1)[:, None], 5, stride=1).flatten(1).amax(1) * 25
        m["locality"] = (w / p.abs().sum((2, 3, 4)).flatten().clamp_min(1e-9)).view(k, k)
        if f.is_file():
            m["transfer"] = torch.load(f)
            continue
        x = m["images"].float() / 255  # (K, n, C, H, W)
        n = x.shape[1]
        inputs = (x[:, None] + p[:, :, None]).clamp(0, 1).flatten(0, 2)  # (K*K*n, C, H, W), (s, t, i)
        tgt = torch.arange(k).view(1, k, 1).expand(k, k, n).flatten()
        rates = []
        for rid, net in refs:
            if rid == m["id"]:
                continue
            pred = torch.cat([net(inputs[j:j + chunk]).argmax(1) for j in range(0, len(inputs), chunk)])
            rates.append((pred == tgt).view(k, k, n).float().mean(2))
        t = torch.stack(rates).mean(0) if rates else torch.full((k, k), float("nan"))
        t.fill_diagonal_(float("nan"))
        torch.save(t, f)
        m["transfer"] = t
        print(f"transfer [{i + 1}/{len(models)}] {m['model']}/{m['attack']}/seed{m['seed']}", flush=True)


def score_mad(m: dict) -> tuple[float, set[int]]:
    """The inspector's own MAD rule: (largest anomaly index, targets of the pairs above 3 or targets above 2)."""
    from backdoorlab.defenses.pairwise import mad_rule

    a, ta = mad_rule(m["norms"], m["precision"])
    a[~m["reached"]] = float("nan")
    named = {int(t) for _, t in torch.nonzero(torch.nan_to_num(a, nan=-1.0) > 3.0).tolist()}
    named |= {int(t) for t in torch.nonzero(ta > 2.0).flatten().tolist()}
    return float(torch.nan_to_num(a, nan=-1e9).max()), named


def score_null(null, m: dict) -> tuple[float, set[int]]:
    """The library's calibrated verdict (PairNull): (score in units of the threshold, named targets)."""
    pz, cz = null.zscores(m["norms"], m["reached"])
    named = {int(t) for _, t in torch.nonzero(torch.nan_to_num(pz, nan=-1.0) > null.threshold).tolist()}
    named |= {int(t) for t in torch.nonzero(cz > null.target_threshold).flatten().tolist()}
    return null.score(m["norms"], m["reached"]), named


def evaluate(models: list[dict], name: str, fn, own_threshold: float | None = None) -> dict:
    """AUROC / TPR@5% on the evaluation half; verdicts at a threshold fitted on the calibration half's
    clean models (or ``own_threshold``, the method's fixed one)."""
    from backdoorlab import metrics as M
    from backdoorlab.population import calibrated_threshold, tpr_at_fpr

    cal = [m for m in models if _cal(m)]
    ev = [m for m in models if not _cal(m)]
    thr = own_threshold if own_threshold is not None else calibrated_threshold(
        [fn(m)[0] for m in cal if m["attack"] == "none"])
    sc = [fn(m) for m in ev]
    s = torch.nan_to_num(torch.tensor([x for x, _ in sc], dtype=torch.float64), nan=-1e9, posinf=1e9, neginf=-1e9)
    t = torch.tensor([m["attack"] != "none" for m in ev])
    flagged = s >= thr if own_threshold is None else s > thr
    named = torch.tensor([m["attack"] != "none" and m["target"] in tg for (_, tg), m in zip(sc, ev)])
    extra = torch.tensor([len(tg - {m["target"]}) for (_, tg), m in zip(sc, ev)], dtype=torch.float64)
    return {"statistic": name, "auroc": M.auroc(s, t), "tpr@5%fpr": tpr_at_fpr(s, t, 0.05), "threshold": thr,
            "false_alarms": f"{int((flagged & ~t).sum())}/{int((~t).sum())}", "tpr": float(flagged[t].float().mean()),
            "found": float((flagged & named)[t].float().mean()),
            "other_targets_named": float(extra[t & flagged].median()) if bool((t & flagged).any()) else float("nan")}


def _shape(models: list[dict]) -> tuple[int, ...]:
    return tuple(models[0]["images"].shape[2:])


def channel_zscores(models: list[dict], values, group=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per model, (pair z, target z) of ``values(m)`` ((K, K), positive, small = anomalous, as the
    pattern norms are) against the calibration half's clean models with the library's pair null:
    leave-one-out for those models themselves, the full null for every other model. With ``group``
    (``m -> key``, e.g. the architecture) each model against the clean models of its own group only."""
    from backdoorlab.defenses._pair_null import fit

    key = group or (lambda m: None)
    cal_clean = [m for m in models if _cal(m) and m["attack"] == "none"]
    full: dict = {}
    out = {}
    for m in models:
        peers = [c for c in cal_clean if key(c) == key(m)]
        others = [c for c in peers if c is not m]
        if len(others) == len(peers):
            if key(m) not in full:
                full[key(m)] = fit([values(c) for c in peers], [c["reached"] for c in peers], _shape(models))
            null = full[key(m)]
        else:
            null = fit([values(c) for c in others], [c["reached"] for c in others], _shape(models))
        out[m["id"]] = null.zscores(values(m), m["reached"])
    return out


def zscore_rule(models: list[dict], zs: dict, group=None):
    """A model score from per-model (pair z, target z): the larger of max pair z and max target z,
    each over its threshold, the thresholds fitted on the calibration half's clean models (their
    leave-one-out z: the larger of the largest and mean + 2.33 SD, as the library's null); with
    ``group`` one pair of thresholds per group, from that group's clean models."""
    import math

    from backdoorlab.defenses._pair_null import _combined, _max_z, tail_threshold

    key = group or (lambda m: None)
    cal_clean = [m for m in models if _cal(m) and m["attack"] == "none"]
    thr = {}
    for g in {key(m) for m in models}:
        peers = [m for m in cal_clean if key(m) == g]
        thr[g] = (tail_threshold([_max_z(zs[m["id"]][0]) for m in peers], default=math.inf),
                  tail_threshold([float(zs[m["id"]][1].max()) for m in peers], default=math.inf))

    def fn(m: dict) -> tuple[float, set[int]]:
        pz, cz = zs[m["id"]]
        tp, tc = thr[key(m)]
        named = {int(t) for _, t in torch.nonzero(torch.nan_to_num(pz, nan=-1.0) > tp).tolist()}
        named |= {int(t) for t in torch.nonzero(cz > tc).flatten().tolist()}
        return _combined(pz, cz, tp, tc), named
    return fn


def arch_rows(models: list[dict]) -> list[dict]:
    """The pair null fitted per architecture (the issue's "clean models of the suspect's architecture"):
    each model's z-scores against the calibration half's clean models of its own architecture, with
    thresholds per architecture or pooled over all of them; beside it the pooled null (the library's).
    Per backdoored evaluation model: each variant's score in units of its threshold (* names the target)."""
    arch = (lambda m: m["model"])
    zp = channel_zscores(models, lambda m: m["norms"])
    za = channel_zscores(models, lambda m: m["norms"], group=arch)
    variants = {"pair null, pooled (the library's)": zscore_rule(models, zp),
                "pair null per architecture, thresholds per architecture": zscore_rule(models, za, group=arch),
                "pair null per architecture, pooled thresholds": zscore_rule(models, za)}
    counts = {a: sum(_cal(m) and m["attack"] == "none" and m["model"] == a for m in models) for a in {arch(m) for m in models}}
    print(f"clean calibration models per architecture: {counts}")
    rows = [evaluated(models, name, fn, 1.0) for name, fn in variants.items()]
    print("evaluation half, per model: score / its threshold (* names the true target)")
    for m in sorted((m for m in models if not _cal(m)), key=lambda m: (m["attack"] == "none", m["model"], m["data"])):
        print(f"  {m['data']:10s} {m['model']:8s} {m['attack']:12s} "
              + "  ".join(f"{u:6.2f}{'*' if m['target'] in named else ' '}" for u, named in (f(m) for f in variants.values())))
    return rows


def calibration_auroc(models: list[dict], fn) -> float:
    """AUROC on the calibration half (its clean models scored leave-one-out): what a choice among
    variants may look at; the evaluation half is only reported."""
    from backdoorlab import metrics as M

    cal = [m for m in models if _cal(m)]
    s = torch.nan_to_num(torch.tensor([fn(m)[0] for m in cal], dtype=torch.float64), nan=-1e9, posinf=1e9, neginf=-1e9)
    return M.auroc(s, torch.tensor([m["attack"] != "none" for m in cal]))


def evaluated(models: list[dict], name: str, fn, own_threshold: float | None = None) -> dict:
    """:func:`evaluate` with the calibration half's AUROC beside it."""
    return {**evaluate(models, name, fn, own_threshold), "calibration_auroc": calibration_auroc(models, fn)}


def transfer_rows(models: list[dict]) -> list[dict]:
    """Issue 22 item 4, measured: do planted patterns transfer less to clean reference models, or
    sit in a smaller window, than natural ones? Each as its own pair null, summed with the norm's
    z-scores (divided by sqrt(n)), and the norm statistic gated to pairs (targets) whose transfer
    (column median) is at most a gate."""
    import math

    def odds(t: torch.Tensor, eps: float = 0.02) -> torch.Tensor:
        t = t.clamp(eps, 1 - eps)
        return t / (1 - t)

    zn = channel_zscores(models, lambda m: m["norms"])
    zt = channel_zscores(models, lambda m: odds(m["transfer"]))  # small odds of moving clean models = anomalous
    zl = channel_zscores(models, lambda m: ((1 - m["locality"]) / m["locality"].clamp_min(1e-3)).clamp_min(1e-3))

    def add(*chs: dict) -> dict:
        r = math.sqrt(len(chs))
        return {k: (sum(c[k][0] for c in chs) / r, sum(c[k][1] for c in chs) / r) for k in chs[0]}

    def gated(gate: float) -> dict:
        out = {}
        for m in models:
            pz, cz = zn[m["id"]]
            t = m["transfer"]
            out[m["id"]] = (pz.masked_fill(t > gate, float("nan")),
                            cz.masked_fill(t.nanmedian(0).values > gate, -math.inf))
        return out

    for m in models:  # the evidence behind the table, evaluation half
        if _cal(m):
            continue
        pz, cz = zn[m["id"]]
        t, src = m["target"], m["source"]
        if m["attack"] == "none":
            i = int(torch.nan_to_num(pz, nan=-1e9).flatten().argmax())
            s_, t_ = divmod(i, pz.shape[0])
            what = f"top pair {s_}->{t_} (z {float(pz[s_, t_]):.2f})"
            tr, loc = m["transfer"][s_, t_], m["locality"][s_, t_]
        elif src is not None:
            what = f"planted pair {src}->{t} (z {float(pz[src, t]):.2f})"
            tr, loc = m["transfer"][src, t], m["locality"][src, t]
        else:
            what = f"planted target {t} (z {float(cz[t]):.2f})"
            tr, loc = m["transfer"][:, t].nanmedian(), m["locality"][:, t].nanmedian()
        print(f"  {m['model']:8s} {m['attack']:12s} {what}: transfer {float(tr):.2f}, locality {float(loc):.2f}")
    variants = {"norm (pair null, as above)": zn, "transfer": zt, "locality (5x5 window share)": zl,
                "norm + transfer": add(zn, zt), "norm + locality": add(zn, zl),
                "norm + transfer + locality": add(zn, zt, zl),
                **{f"norm, pairs with transfer <= {g}": gated(g) for g in (0.02, 0.05, 0.1, 0.2)}}
    rows = []
    for name, zs in variants.items():
        rows.append(evaluated(models, name, zscore_rule(models, zs), 1.0))
    return rows


def channel_rows(models: list[dict], other: dict[str, dict], label: str) -> list[dict]:
    """A second scan's norms (``other``, by cell id) beside the first's: each alone, their z-scores
    summed (over sqrt 2) and their larger, through the same pair null and thresholds as
    :func:`transfer_rows`. A pair counts as reached when both scans reached it."""
    import math

    both = {m["id"]: m["reached"] & other[m["id"]]["reached"] for m in models}
    saved = {m["id"]: m["reached"] for m in models}
    for m in models:
        m["reached"] = both[m["id"]]
    try:
        za = channel_zscores(models, lambda m: m["norms"])
        zb = channel_zscores(models, lambda m: other[m["id"]]["norms"])
    finally:
        for m in models:
            m["reached"] = saved[m["id"]]
    zsum = {k: ((za[k][0] + zb[k][0]) / math.sqrt(2), (za[k][1] + zb[k][1]) / math.sqrt(2)) for k in za}
    zmax = {k: (torch.fmax(za[k][0], zb[k][0]), torch.maximum(za[k][1], zb[k][1])) for k in za}
    rows = []
    for name, zs in {"first scan (pairs both reached)": za, f"second scan ({label})": zb,
                     "sum of both": zsum, "larger of both": zmax}.items():
        rows.append(evaluated(models, name, zscore_rule(models, zs), 1.0))
    return rows


def inspector_scores(grid: str, config: Path | None, names: tuple[str, ...]) -> dict[tuple, dict]:
    """The population run's own inspector cells (``backdoorlab population``), by (data, model,
    attack, seed, defense): their metrics (``max_anomaly``, ``target_found``)."""
    rows, recs = _population_rows(grid, config, defenses=names)
    return {(r.data, r.model, r.attack, r.seed, r.defense): recs[r.cell_id].metrics for r in rows}


def inspector_units(models: list[dict], cells: dict[tuple, dict], name: str):
    """``m -> (score, names the true target)`` of a population inspector cell (``max_anomaly``), the
    score in units of its threshold fitted on the calibration half's clean models (leave-one-out for
    those: the library's tail rule, max(largest, mean + 2.33 SD))."""
    from backdoorlab.defenses._pair_null import tail_threshold

    cal_clean = [m for m in models if _cal(m) and m["attack"] == "none"]

    def raw(m: dict) -> tuple[float, bool]:
        mt = cells.get((m["data"], m["model"], m["attack"], m["seed"], name))
        if mt is None:
            raise SystemExit(f"no {name} cell for {m['data']}/{m['model']}/{m['attack']}/seed{m['seed']}: run "
                             f"`backdoorlab population` with {name} in the YAML's defenses first")
        return float(mt["max_anomaly"]), bool(mt.get("target_found") or 0.0)
    vals = {m["id"]: raw(m)[0] for m in cal_clean}

    def units(m: dict) -> tuple[float, bool]:
        s, named = raw(m)
        return s / tail_threshold([v for k, v in vals.items() if k != m["id"]], default=math.inf), named
    return units


def fusion_rows(models: list[dict], null_score, cells: dict[tuple, dict], names: tuple[str, ...]) -> list[dict]:
    """The pair-null verdict OR'ed with other inspectors' (Neural Cleanse, bias maps): each
    inspector's model score in units of its own threshold fitted on the calibration half's clean
    models (leave-one-out for those: the library's tail rule, max(largest, mean + 2.33 SD)); the
    fused score is the largest; a model is found when a flagged inspector names its target."""
    def pair(m: dict) -> tuple[float, bool]:
        s, named = null_score(m)
        return s, m["target"] in named

    channels = {"pair-null": pair, **{n: inspector_units(models, cells, n) for n in names}}

    def fused(keys: tuple[str, ...]):
        def fn(m: dict) -> tuple[float, set[int]]:
            got = [channels[k](m) for k in keys]
            named = {m["target"]} if any(u > 1.0 and hit for u, hit in got) else set()
            return max(u for u, _ in got), named
        return fn

    rows = []
    for keys in [(n,) for n in names] + [("pair-null", n) for n in names] + ([("pair-null", *names)] if len(names) > 1 else []):
        rows.append(evaluated(models, " OR ".join(keys) + " (each at its calibrated threshold)", fused(keys), 1.0))
    print("evaluation half, per model: score / its threshold (* the inspector names the true target)")
    for m in models:
        if not _cal(m):
            print(f"  {m['data']:10s} {m['model']:8s} {m['attack']:12s} "
                  + "  ".join(f"{k} {u:5.2f}{'*' if hit else ' '}" for k, (u, hit) in ((k, f(m)) for k, f in channels.items())))
    return rows


def nc_scan(grid: str, cache: Path, limit: int | None, config: Path | None, images: int) -> list[dict]:
    """Neural Cleanse (``images`` clean images per class, its other defaults: the population cells'
    setting) once per model: the per-target mask L1 norms and whether each reached the paper's 99%."""
    from backdoorlab.defenses.neural_cleanse import NeuralCleanse

    insp = NeuralCleanse(images_per_class=images)

    def scan(model, holdout) -> dict:
        res = insp.inspect(model, holdout)
        return {"nc_norms": res.scores.double(), "nc_reached": res.details["reached"].bool()}

    return _scan_each(grid, cache, f"-nc{images}", scan, limit, config)


def nc_rows(models: list[dict], cells: dict[tuple, dict] | None = None, names: tuple[str, ...] = (),
            per_arch: bool = False) -> list[dict]:
    """Neural Cleanse's per-target mask norms as model scores (issue 22 item 4): the paper's MAD
    index of the L1 norms (threshold 2, and fitted on the calibration half), the same index of the
    log norms (a trigger's norm is a scale: one planted target among natural ones spans a factor of
    3-15 on CIFAR-10), and a target null: each target's log norm minus the model's median log norm,
    as a z-score against the same target in the calibration half's clean models (leave-one-out for
    those), scored in units of its tail threshold. Unreached targets cannot be flagged."""
    import math

    from backdoorlab.defenses._pair_null import fit_targets, target_residuals, tail_threshold
    from backdoorlab.defenses.base import mad_anomaly_index

    def mad(log: bool):
        def fn(m: dict) -> tuple[float, set[int]]:
            v = m["nc_norms"].log() if log else m["nc_norms"]
            a = -mad_anomaly_index(v)
            a[~m["nc_reached"]] = float("nan")
            a = torch.nan_to_num(a, nan=-1e9)
            return float(a.max()), {int(t) for t in torch.nonzero(a > 2.0).flatten().tolist()}
        return fn

    def resid(m: dict) -> torch.Tensor:
        return target_residuals(m["nc_norms"])

    cal_clean = [m for m in models if _cal(m) and m["attack"] == "none"]

    def target_null(sd_rule: str):
        """Variants of the target null measured beside the library's (``fit_targets``)."""
        def z(m: dict) -> torch.Tensor:
            ref = torch.stack([resid(c) for c in cal_clean if c is not m])
            mu = ref.mean(0)
            sd = (ref - mu).pow(2).mean().sqrt().expand_as(mu) if sd_rule == "pooled" else ref.std(0)
            out = (mu - resid(m)) / sd.clamp_min(0.05)
            out[~m["nc_reached"]] = float("nan")
            return torch.nan_to_num(out, nan=-1e9)
        thr = tail_threshold([float(z(c).max()) for c in cal_clean], default=math.inf)

        def fn(m: dict) -> tuple[float, set[int]]:
            zz = z(m)
            return float(zz.max()) / thr, {int(t) for t in torch.nonzero(zz > thr).flatten().tolist()}
        return fn

    def library_null(group=None):
        """The library's TargetNull (what `backdoorlab calibrate --inspector neural-cleanse` fits) of the
        calibration half's clean models (with ``group``, those of the model's group only); leave-one-out
        for those models themselves."""
        key = group or (lambda m: None)
        shape = _shape(models)
        nulls: dict = {}

        def null_for(m: dict):
            peers = [c for c in cal_clean if key(c) == key(m) and c is not m]
            fresh = any(c is m for c in cal_clean)
            if fresh or key(m) not in nulls:
                got = fit_targets([c["nc_norms"] for c in peers], [c["nc_reached"] for c in peers], shape)
                if fresh:
                    return got
                nulls[key(m)] = got
            return nulls[key(m)]

        def fn(m: dict) -> tuple[float, set[int]]:
            null = null_for(m)
            z = null.zscores(m["nc_norms"], m["nc_reached"])
            return null.score(m["nc_norms"], m["nc_reached"]), {int(t) for t in torch.nonzero(z > null.threshold).flatten().tolist()}
        return fn

    library = library_null()

    rows = []
    tn = library
    for name, fn, own in [("NC: MAD of L1 norms (the paper's, threshold 2)", mad(False), 2.0),
                          ("NC: MAD of L1 norms, threshold fitted on the calibration half", mad(False), None),
                          ("NC: MAD of log norms (threshold 2)", mad(True), 2.0),
                          ("NC: MAD of log norms, threshold fitted on the calibration half", mad(True), None),
                          ("NC: target null, per-target SD (leave-one-out tail threshold)", target_null("per-target"), 1.0),
                          ("NC: target null, pooled SD (leave-one-out tail threshold)", target_null("pooled"), 1.0),
                          ("NC: target null, per-target SD floored at their median (the library's TargetNull)", tn, 1.0)]:
        rows.append(evaluated(models, name, fn, own))
    if "norms" in models[0]:  # the pairwise scans too: the pair null OR the target null
        lib = zscore_rule(models, channel_zscores(models, lambda m: m["norms"]))

        for name, fn in [("pair null (library)", lib), ("pair null OR NC target null (floored SD)", either(lib, tn))]:
            rows.append(evaluated(models, name, fn, 1.0))
        if per_arch:  # both nulls fitted on the clean models of the model's own architecture
            arch = (lambda m: m["model"])
            lib_a = zscore_rule(models, channel_zscores(models, lambda m: m["norms"], group=arch), group=arch)
            tn_a = library_null(arch)
            for name, fn in [("NC target null per architecture", tn_a), ("pair null per architecture", lib_a),
                             ("pair null OR NC target null, both per architecture", either(lib_a, tn_a))]:
                rows.append(evaluated(models, name, fn, 1.0))
            print("evaluation half, per architecture nulls: score / its threshold (* names the true target)")
            for m in sorted((m for m in models if not _cal(m)), key=lambda m: (m["attack"] == "none", m["model"], m["data"])):
                got = [(k, f(m)) for k, f in (("pair null", lib_a), ("NC target null", tn_a))]
                print(f"  {m['data']:10s} {m['model']:8s} {m['attack']:12s} "
                      + "  ".join(f"{k} {u:6.2f}{'*' if m['target'] in named else ' '}" for k, (u, named) in got))
        channels = {"pair null": lib, "NC target null": tn,
                    **{n: inspector_units(models, cells or {}, n) for n in names}}
        rows += sum_rows(models, channels)
        print("evaluation half, per model: score / its threshold (* names the true target)")
        for m in models:
            if not _cal(m):
                got = [(k, f(m)) for k, f in (("pair null", lib), ("NC target null", tn))]
                print(f"  {m['data']:10s} {m['model']:8s} {m['attack']:12s} "
                      + "  ".join(f"{k} {u:6.2f}{'*' if m['target'] in named else ' '}" for k, (u, named) in got))
    return rows


def either(f, g):
    """The OR of two verdicts in units of their thresholds: the larger score; the targets each names
    when it is above its threshold."""
    def fn(m: dict) -> tuple[float, set[int]]:
        (a, na), (b, nb) = f(m), g(m)
        return max(a, b), (na if a > 1.0 else set()) | (nb if b > 1.0 else set())
    return fn


def sum_rows(models: list[dict], channels: dict) -> list[dict]:
    """Score-level fusion: the sum of the channels' scores, each in units of its own calibrated
    threshold, against a tail threshold fitted on the calibration half's clean models' sums (each
    channel already leave-one-out for those). An OR of thresholds spends its false-alarm budget
    once per channel; a sum lets two channels that are each below their threshold add up. The
    named target is the pair null's largest target z (the true target in every learned backdoor of
    the MNIST population). Variants: the plain sum, and the sum of log(1 + units) (bias maps' raw
    scores span two orders of magnitude on clean bn-cnn models)."""
    import itertools

    from backdoorlab.defenses._pair_null import tail_threshold

    zs = channel_zscores(models, lambda m: m["norms"])
    cal_clean = [m for m in models if _cal(m) and m["attack"] == "none"]

    def top(m: dict) -> int:
        return int(torch.nan_to_num(zs[m["id"]][1], nan=-1e9).argmax())

    rows = []
    keys = list(channels)
    combos = [c for k in range(2, len(keys) + 1) for c in itertools.combinations(keys, k)]
    for combo in combos:
        for log in (False, True):
            def fn(m: dict, combo=combo, log=log) -> tuple[float, set[int]]:
                u = [max(float(channels[k](m)[0]), 0.0) for k in combo]
                return sum(math.log1p(v) if log else v for v in u), {top(m)}
            thr = tail_threshold([fn(c)[0] for c in cal_clean], default=math.inf)
            name = ("sum of log(1 + units): " if log else "sum of units: ") + " + ".join(combo)
            rows.append(evaluated(models, name, fn, thr))
    print("evaluation half, per model: each channel's score / its threshold (* the pair null's top target is the true one)")
    for m in models:
        if not _cal(m):
            print(f"  {m['data']:10s} {m['model']:8s} {m['attack']:12s}{'*' if top(m) == m['target'] else ' '} "
                  + "  ".join(f"{k} {float(f(m)[0]):6.2f}" for k, f in channels.items()))
    return rows


def load_models(args, params: dict) -> list[dict]:
    """The population's models with their pairwise scans (and Neural Cleanse's with ``--nc``), then
    the ``--extra-clean`` grids' models, which join the calibration half."""
    from backdoorlab.grid import load_grid

    def scanned(grid: str, config: Path | None) -> list[dict]:
        models = scan_population(grid, args.cache, params, args.limit, config)
        if args.nc:
            nc = {m["id"]: m for m in nc_scan(grid, args.cache, args.limit, config, args.nc)}
            for m in models:
                m.update({k: v for k, v in nc[m["id"]].items() if k not in m})
        return models

    models = scanned(args.grid, args.config)
    for extra in args.extra_clean:  # more clean models for the calibration half only
        more = scanned(load_grid(extra).name, extra)
        if any(m["attack"] != "none" for m in more) or {m["seed"] for m in more} & {m["seed"] for m in models}:
            raise SystemExit(f"{extra}: give a grid of clean models only, with seeds the population does not use")
        CAL_SEEDS.update(m["seed"] for m in more)
        models += more
    return models


def learned_only(models: list[dict]) -> list[dict]:
    """The clean models and the backdoored ones whose attack took (ASR >= 0.5)."""
    learned = [m for m in models if m["attack"] == "none" or (m["asr"] or 0) >= 0.5]
    print(f"{len(models)} models ({sum(m['attack'] == 'none' for m in models)} clean); "
          f"{len(models) - len(learned)} backdoored ones with ASR < 0.5 left out")
    return learned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="population-mnist")
    ap.add_argument("--cache", type=Path, default=Path("population-scans"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--config", type=Path, default=None,
                    help="the population YAML: only its current cells (the store may hold cells of earlier versions)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N models (a smoke test)")
    ap.add_argument("--transfer", action="store_true",
                    help="also measure how each pattern transfers to the calibration half's clean models")
    ap.add_argument("--set", action="append", default=[], help="a pairwise parameter for the scans, e.g. formulation=mask")
    ap.add_argument("--with", dest="with_", action="append", default=[], metavar="KEY=VALUE",
                    help="a second scan of every model with these parameters (e.g. norm=l2), its norms combined "
                         "with the first scan's as pair-null channels")
    ap.add_argument("--fuse", default=None, metavar="NAMES",
                    help="inspectors of the population run to OR with the pair null, e.g. neural-cleanse,bias-maps "
                         "(their cells from the store)")
    ap.add_argument("--extra-clean", type=Path, action="append", default=[], metavar="YAML",
                    help="a grid of clean models only (e.g. configs/populations/mnist_clean_extra.yaml, run with "
                         "`backdoorlab bench` into the same store): its models join the calibration half")
    ap.add_argument("--calibration-seed", type=int, default=0,
                    help="the population's seed that calibrates (the other seeds are reported): 1 swaps the halves")
    ap.add_argument("--per-arch", action="store_true",
                    help="also the pair null fitted per architecture (needs several clean calibration models each)")
    ap.add_argument("--nc", type=int, default=None, metavar="IMAGES",
                    help="instead: Neural Cleanse's statistics over the population (this many clean images per class, "
                         "the population cells' setting; scans cached in --cache)")
    args = ap.parse_args()
    from backdoorlab.runtime import tune_allocator

    tune_allocator()
    def parse(items: list[str]) -> dict:
        return {k: (int(v) if v.isdigit() else v) for k, v in (p.split("=", 1) for p in items)}

    params = parse(args.set)
    CAL_SEEDS.clear()
    CAL_SEEDS.add(args.calibration_seed)
    models = load_models(args, params)
    if args.nc:
        names = tuple(args.fuse.split(",")) if args.fuse else ()
        cells = inspector_scores(args.grid, args.config, names) if names else None
        rows = nc_rows(learned_only(models), cells, names, per_arch=args.per_arch)
        show(rows)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return
    learned = learned_only(models)
    if args.transfer:
        add_transfer(learned, args.cache)
    from backdoorlab.defenses._pair_null import fit

    cal_clean = [m for m in learned if _cal(m) and m["attack"] == "none"]
    null = fit([m["norms"] for m in cal_clean], [m["reached"] for m in cal_clean], _shape(learned), "calibration half")
    print(f"null: {null.describe()}")
    lib = zscore_rule(learned, channel_zscores(learned, lambda m: m["norms"]))
    print(f"pair-null AUROC on the calibration half (clean models leave-one-out; what a choice may use): "
          f"{calibration_auroc(learned, lib):.3f}")
    rows = [evaluate(learned, "mad rule (fixed threshold 3 / 2)", score_mad, own_threshold=3.0),
            evaluate(learned, "mad, threshold fitted on the calibration half", score_mad),
            evaluate(learned, "pair-null (library), its leave-one-out threshold", lambda m: score_null(null, m),
                     own_threshold=1.0),
            evaluate(learned, "pair-null, threshold fitted on the calibration half", lambda m: score_null(null, m))]
    for kind in sorted({m["attack"] for m in learned if not _cal(m) and m["attack"] != "none"}):
        sub = [m for m in learned if m["attack"] in ("none", kind)]
        r = evaluate(sub, f"  pair-null on {kind}", lambda m: score_null(null, m), own_threshold=1.0)
        rows.append(r)
    for arch in sorted({m["model"] for m in learned}):
        sub = [m for m in learned if m["model"] == arch]
        if any(not _cal(m) and m["attack"] == "none" for m in sub) and any(not _cal(m) and m["attack"] != "none" for m in sub):
            rows.append(evaluate(sub, f"  pair-null on {arch}", lambda m: score_null(null, m), own_threshold=1.0))
    show(rows)
    if args.per_arch:
        print(f"\nthe pair null per architecture (calibration seeds {sorted(CAL_SEEDS)}; calibration_auroc: the calibration half's)")
        more = arch_rows(learned)
        show(more)
        rows += more
    if args.transfer:
        print("\ntransfer and locality (calibration_auroc: on the calibration half, the only one a choice may use)")
        more = transfer_rows(learned)
        show(more)
        rows += more
    if args.with_:
        other = {m["id"]: m for m in scan_population(args.grid, args.cache, {**params, **parse(args.with_)}, args.limit,
                                                     args.config)}
        print(f"\nsecond scan ({', '.join(args.with_)}) as a channel (calibration_auroc: the calibration half's)")
        more = channel_rows(learned, other, ", ".join(args.with_))
        show(more)
        rows += more
    if args.fuse:
        names = tuple(args.fuse.split(","))
        print(f"\nfused with {', '.join(names)} (calibration_auroc: the calibration half's)")
        more = fusion_rows(learned, lib, inspector_scores(args.grid, args.config, names), names)
        show(more)
        rows += more
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def show(rows: list[dict]) -> None:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols), flush=True)


if __name__ == "__main__":
    main()
