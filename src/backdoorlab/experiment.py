"""The one orchestrator: ``run(cfg, store) -> RunRecord``.

Stages (each timed): load and split the data, poison the training set and build the triggered
test set, train the victim (or reuse the cached one with the same data/attack/model/training/seed),
evaluate CA, ASR and robust accuracy, write the run folder (config, metrics, weights, figures)
and index it in the store. Only this module and the CLI write files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from backdoorlab import metrics as M
from backdoorlab.attacks.base import TrainingAttack
from backdoorlab.config import ExperimentConfig
from backdoorlab.errors import BackdoorLabError
from backdoorlab.evaluation import Truth
from backdoorlab.store import RunRecord, Store, atomic_write_json, new_run_id
from backdoorlab.types import ImageSet, PoisonedSet, Splits

log = logging.getLogger(__name__)

Callback = Callable[..., None]


@dataclass
class Prepared:
    """Data and attack of an experiment, before training."""

    splits: Splits
    train_set: ImageSet  # poisoned (a PoisonedSet) when there is an attack
    triggered_test: PoisonedSet | None
    attack: Any | None
    timings: dict[str, float] = field(default_factory=dict)
    attack_section: Any | None = None


def setup_torch(cfg: ExperimentConfig) -> torch.device:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        device = torch.device(cfg.device)
    except RuntimeError as exc:
        raise BackdoorLabError(f"device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackdoorLabError("device: 'cuda' asked for but no GPU is available; use device: cpu")
    return device


def load_splits(cfg: ExperimentConfig) -> Splits:
    from backdoorlab.data import make_splits
    from backdoorlab.data.sources import DATASETS

    raw = DATASETS.build(cfg.data.name, cfg.data.extras(), where="data")
    return make_splits(raw.train, raw.test, seed=cfg.seed, test_fraction=cfg.data.test_fraction,
                       holdout_fraction=cfg.data.holdout_fraction, train_size=cfg.data.train_size,
                       test_size=cfg.data.test_size)


def prepare(cfg: ExperimentConfig) -> Prepared:
    """Load, split and poison (no training)."""
    from backdoorlab.attacks import ATTACKS, poison, poison_test

    t = {}
    t0 = time.perf_counter()
    splits = load_splits(cfg)
    t["data"] = time.perf_counter() - t0
    if cfg.attack is None:
        return Prepared(splits, splits.train, None, None, t)
    t0 = time.perf_counter()
    a = cfg.attack
    attack = ATTACKS.build(a.name, a.extras(), where="attack")
    if isinstance(attack, TrainingAttack):  # it poisons while training the victim: see train_victim
        attack.check(splits.train, rate=a.rate, target=a.target, source=a.source, mode=a.mode)
        return Prepared(splits, splits.train, None, attack, t, a)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    poisoned = poison(splits.train, attack, rate=a.rate, target=a.target, source=a.source, mode=a.mode, generator=g)
    triggered = poison_test(splits.test, attack, target=a.target, source=a.source, mode=a.mode,
                            generator=torch.Generator().manual_seed(cfg.seed + 2))
    t["poison"] = time.perf_counter() - t0
    return Prepared(splits, poisoned, triggered, attack, t, a)


def train_victim(cfg: ExperimentConfig, prep: Prepared, store: Store | None, callbacks=(),
                 train_seed: int | None = None) -> tuple[torch.nn.Module, dict, bool]:
    """Train (or load from the cache) the victim. Returns (model, history dict, from_cache).
    ``train_seed`` (default ``cfg.seed``, which also seeds the splits) seeds the training alone."""
    from backdoorlab.models import ModelSpec, build_model, load_model, save_model
    from backdoorlab.train import train

    device = setup_torch(cfg)
    data = prep.train_set
    spec = ModelSpec(cfg.model.name, data.num_classes, data.shape, cfg.model.extras())
    torch.manual_seed(cfg.seed)  # the initial weights: a victim is the same in every process (grids, resume)
    if isinstance(prep.attack, TrainingAttack):
        return _train_with_training_attack(cfg, prep, build_model(spec).to(device), callbacks)
    key = cfg.victim_key() if train_seed is None else f"{cfg.victim_key()}-train-seed-{train_seed}"
    cache = store.cache_path(key) if (store is not None and cfg.cache) else None
    if cache is not None and cache.is_file():
        try:
            model = load_model(cache, num_classes=data.num_classes, input_shape=data.shape).to(device)
            hist_path = cache.with_suffix(".history.json")
            import json

            hist = json.loads(hist_path.read_text()) if hist_path.is_file() else {}
            log.info("reusing cached victim %s", key)
            return model, hist, True
        except BackdoorLabError as exc:
            log.warning("ignoring unreadable cached victim %s: %s", cache, exc)
    model = build_model(spec).to(device)
    training_set = data.without_ground_truth() if isinstance(data, PoisonedSet) else data
    history = train(model, training_set, cfg.train, seed=cfg.seed if train_seed is None else train_seed,
                    callbacks=tuple(callbacks)).as_dict()
    if cache is not None:
        save_model(model, cache)
        atomic_write_json(cache.with_suffix(".history.json"), history)
    return model, history, False


def _train_with_training_attack(cfg: ExperimentConfig, prep: Prepared, model: torch.nn.Module,
                                callbacks=()) -> tuple[torch.nn.Module, dict, bool]:
    """A :class:`TrainingAttack` trains the victim itself; it fills in ``prep.triggered_test`` (and
    ``prep.train_set`` when it poisoned a fixed set). Not cached: the trigger is not stored."""
    a = cfg.attack
    t0 = time.perf_counter()
    res = prep.attack.train_victim(model, prep.splits.train, cfg.train, rate=a.rate, target=a.target, source=a.source,
                                   mode=a.mode, seed=cfg.seed, callbacks=tuple(callbacks))
    t1 = time.perf_counter()
    prep.triggered_test = res.triggered_test(prep.splits.test, target=a.target, source=a.source, mode=a.mode,
                                             generator=torch.Generator().manual_seed(cfg.seed + 2))
    if res.poisoned is not None:
        prep.train_set = res.poisoned
    log.info("training-time attack %s: victim trained in %.1f s", prep.attack.describe(), t1 - t0)
    return res.model, res.history, False


def evaluate_victim(model: torch.nn.Module, prep: Prepared, batch_size: int = 1024) -> dict[str, float]:
    from backdoorlab.train import predict

    out: dict[str, float] = {}
    test = prep.splits.test
    out["clean_accuracy"] = M.clean_accuracy(predict(model, test, batch_size), test.y)
    if prep.triggered_test is not None:
        trig = prep.triggered_test
        pred = predict(model, trig, batch_size)
        out["attack_success_rate"] = M.attack_success_rate(pred, trig.y)
        out["robust_accuracy"] = M.robust_accuracy(pred, trig.y_source)
    if isinstance(prep.train_set, PoisonedSet):
        out["poison_count"] = float(prep.train_set.is_poison.sum())
        out["poison_fraction"] = float(prep.train_set.is_poison.float().mean())
    out["train_size"] = float(len(prep.train_set))
    out["test_size"] = float(len(test))
    out["holdout_size"] = float(len(prep.splits.holdout))
    return out


def truth_of(prep: Prepared, ca: float | None = None, asr: float | None = None) -> Truth:
    """What the runner knows of a prepared experiment and its defenses never see."""
    p = prep.train_set if isinstance(prep.train_set, PoisonedSet) else None
    a = prep.attack_section
    return Truth(is_poison=p.is_poison if p is not None else None, y_source=p.y_source if p is not None else None,
                 target=a.target if a is not None else None, source=a.source if a is not None else None,
                 mode=a.mode if a is not None else None, test=prep.splits.test, triggered=prep.triggered_test,
                 ca_before=ca, asr_before=asr)


def run_defense(defense, model: torch.nn.Module, prep: Prepared, ca: float, asr: float | None,
                batch_size: int = 1024, context: dict | None = None, seed: int = 0) -> tuple[dict[str, float], dict[str, bytes]]:
    """Run one defense through its family's contract (:func:`backdoorlab.evaluation.apply_defense`)
    with what its threat model allows (the victim, the clean held-out set, the training set without
    ground truth), then score it with the truth. A robust trainer trains a fresh copy of the
    victim's architecture (initial weights from ``seed``) in place of normal training. ``context``
    carries a reference-model factory (``"reference"``) and the last inspection (``"inspection"``)
    between the defenses of one victim. Returns (metrics, figures as PNG bytes)."""
    from backdoorlab.evaluation import apply_defense, figures, make_evaluator, score

    context = {} if context is None else context
    truth = truth_of(prep, ca, asr)
    target = model
    if defense.family == "robust-trainer":
        from backdoorlab.models import ModelSpec, build_model
        from backdoorlab.train import model_device

        spec = model.spec
        torch.manual_seed(seed)  # the fresh model's initial weights, as for the victim
        target = build_model(ModelSpec(spec.name, spec.num_classes, spec.input_shape, spec.params)).to(model_device(model))
    trig = prep.triggered_test
    inspection = None
    if defense.family == "cleanser" and context.get("inspector") is not None and context["inspector"] == defense.inspector():
        inspection = context.get("inspection")  # the same inspector already ran on this victim
    applied = apply_defense(
        defense, target, clean=prep.splits.holdout, data=prep.train_set, test_inputs=prep.splits.test.x,
        triggered_inputs=trig.x if trig is not None else None, reference=context.get("reference"),
        inspection=inspection, evaluate=make_evaluator(prep.splits.test, trig, batch_size))
    if defense.family == "inspector":
        context["inspector"], context["inspection"] = defense, applied.result  # a cleanser later may build on it
    return score(applied, truth, batch_size), figures(applied, truth)


def defense_context(cfg: ExperimentConfig, prep: Prepared, store: Store | None) -> dict:
    """The context the defenses of one victim share: a factory of clean reference models (trained
    once per seed, only when a defense asks for one) and, once an inspector ran, its result."""
    refs: dict[int, torch.nn.Module] = {}

    def reference(seed: int) -> torch.nn.Module:
        if seed not in refs:
            refs[seed] = train_reference(cfg, prep, store, seed)
        return refs[seed]

    return {"reference": reference}


def train_reference(cfg: ExperimentConfig, prep: Prepared, store: Store | None, seed: int) -> torch.nn.Module:
    """A clean reference model for inspectors that compare with one (``bias-maps``): the victim's
    architecture and training config, trained with ``seed`` on the clean training split (the same
    split as the victim's, before poisoning); cached in the store like a victim."""
    clean_cfg = cfg.model_copy(update={"attack": None, "defenses": []})
    clean_prep = Prepared(prep.splits, prep.splits.train, None, None)
    log.info("training a clean reference model (seed %d) for the bias-maps comparison", seed)
    model, _, _ = train_victim(clean_cfg, clean_prep, store, train_seed=seed)
    return model.eval()


def _sample_figure(prep: Prepared) -> bytes | None:
    from backdoorlab.plots import sample_grid

    p = prep.train_set
    if not isinstance(p, PoisonedSet) or not bool(p.is_poison.any()):
        return None
    idx = torch.nonzero(p.is_poison).flatten()
    idx = idx[torch.linspace(0, idx.numel() - 1, min(8, idx.numel())).round().long()]  # spread over classes
    clean = prep.splits.train.x[idx]
    return sample_grid(clean, p.x[idx], prep.splits.train.y[idx].tolist(), p.y[idx].tolist(),
                       p.class_names, title=prep.attack.describe() if prep.attack is not None else "")


def run(cfg: ExperimentConfig, store: Store, *, callbacks: tuple[Callback, ...] = ()) -> RunRecord:
    """Run one experiment end to end and store it (atomically). Returns the stored record."""
    t_start = time.perf_counter()
    created = time.time()
    setup_torch(cfg)
    prep = prepare(cfg)
    timings = dict(prep.timings)
    t0 = time.perf_counter()
    model, history, cached = train_victim(cfg, prep, store, callbacks)
    timings["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results = evaluate_victim(model, prep, cfg.train.eval_batch_size)
    timings["evaluate"] = time.perf_counter() - t0
    from backdoorlab.defenses import DEFENSES

    defense_figs: dict[str, bytes] = {}
    context = defense_context(cfg, prep, store)
    for i, d in enumerate(cfg.defenses):
        defense = DEFENSES.build(d.name, d.extras(), where=f"defenses.{i}")
        m, figs = run_defense(defense, model, prep, results["clean_accuracy"], results.get("attack_success_rate"),
                              cfg.train.eval_batch_size, context, seed=cfg.seed)
        results.update({f"defense.{d.name}.{k}": v for k, v in m.items()})
        defense_figs.update({f"{d.name}_{k}": v for k, v in figs.items()})
    from backdoorlab.records import victim_figures, write_run

    seconds = time.perf_counter() - t_start
    metrics = {**results, **{f"seconds_{k}": v for k, v in timings.items()}, "victim_from_cache": float(cached)}
    return write_run(store, new_run_id(cfg.name), name=cfg.name, kind="experiment", config=cfg, metrics=metrics,
                     seconds=seconds, figures={**victim_figures(prep, history, cfg.name), **defense_figs},
                     weights=model, history=history or {"epochs": []}, created=created)
