"""CIFAR-10 at full scale on a CPU (issue 26): parquet load times, fastnet's time-to-accuracy, seconds
per epoch beside preact-resnet18, and victims of 10%-poisoned attacks trained with the fastnet recipe.

Parts (each one command; run each under ``flock /tmp/heavy.lock`` on a shared machine):

- ``load``: the full parquet set (50,000 + 10,000 JPEGs) decoded the first time (into a fresh cache
  folder) and from the cache (median of 3), through ``load_source("cifar10", full=True)``.
- ``train``: ``configs/fastnet_cifar10.yaml`` (clean) through the library's trainer; after each epoch
  from ``--curve-from`` on, CA on the 10,000 test images (evaluated under bf16 autocast where the
  CPU has it, with the model's flip TTA; the evaluation time is not counted in the training clock),
  the time to CA 0.90 / 0.92 / 0.94, then the final CA in float32 with the library's ``evaluate``.
  ``--subset``: the 10,000-image npz subset (9,500 after the 5% holdout) instead of the 50,000.
- ``epoch``: seconds per epoch of fastnet and preact-resnet18 on 47,500 images, from ``--batches``
  timed training steps (after 2 warm-up steps), same batch size, fp32 and bf16 autocast.
- ``attack``: ``--attack badnets|blend|sig|wanet|input-aware`` (10% poisoned, all-to-one -> 0; ``ATTACK_SETTINGS``) with the fastnet recipe:
  CA, ASR; ``--strip`` also screens the triggered and clean test sets with STRIP (FRR preset 1% on
  the clean holdout): FRR, FAR; ``strip --load F`` does that for a victim saved by ``attack --save F``.
- ``abl --attack sig [--load F]``: ABL (seed 003's setting) trained with the fastnet recipe on the full
  poisoned set (``abl_params``; ``-p abl.KEY=VALUE``, ``-p abl.recipe.KEY=VALUE``), through the runner's
  path: isolation precision, CA and ASR after each phase; ``--load`` the undefended victim for its CA /
  ASR. ``--epochs`` is ABL's total (``--epochs 2 -p abl.unlearning_epochs=0``: the isolation phase alone).
- ``isolation --attack sig``: ABL's isolation phase alone (``--epochs`` LGA epochs, ``-p abl.KEY=VALUE``),
  watched after every epoch: how well the per-sample losses single out the poisoned samples
  (precision of the lowest 1%, AUROC; ground truth for the diagnosis only) and the classes of the lowest 1%;
  ``--save-passes F`` keeps every loss pass for ``isolation_rules.py`` (scoring rules compared offline).
- ``repair --load F``: the repairers (``--repairers``, ``-p NAME.KEY=VALUE``) on a saved victim, on its
  clean held-out set (2,500 images), through the runner's path: CA, ASR, DER, seconds.

    BACKDOORLAB_DATA=../shared/data python benchmarks/bench_cifar_full.py load
    BACKDOORLAB_DATA=../shared/data python benchmarks/bench_cifar_full.py train [--epochs 10] [--subset] [--seed 0]
    BACKDOORLAB_DATA=../shared/data python benchmarks/bench_cifar_full.py epoch [--batches 6]
    BACKDOORLAB_DATA=../shared/data python benchmarks/bench_cifar_full.py attack --attack badnets [--strip] [--save F]
    BACKDOORLAB_DATA=../shared/data python benchmarks/bench_cifar_full.py strip --attack badnets --load F [--strip-n 1000]
    BACKDOORLAB_DATA=../shared/data python benchmarks/bench_cifar_full.py repair --attack badnets --load F [--repairers fine-pruning,nad]
    BACKDOORLAB_DATA=../shared/data python benchmarks/bench_cifar_full.py abl --attack sig --load F [-p abl.gamma=0.5]
    BACKDOORLAB_DATA=../shared/data python benchmarks/bench_cifar_full.py isolation --attack sig --set attack.rate=0.1 --epochs 4 [-p abl.lr=0.5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import ROOT, header, need_shared

from backdoorlab.train import bf16_autocast_supported


def _cpu() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    kind = "AMX+AVX-512 BF16" if "amx_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "?"
    return (f"{kind}; torch capability {torch.backends.cpu.get_cpu_capability()}; "
            f"bf16 autocast {'on' if bf16_autocast_supported() else 'off (fp32)'}")


def part_load(args) -> dict:
    from backdoorlab.data import load_source

    with tempfile.TemporaryDirectory(prefix="bl-cache-") as d:
        t0 = time.perf_counter()
        raw = load_source("cifar10", full=True, cache=d)
        first = time.perf_counter() - t0
        cached = []
        for _ in range(3):
            t0 = time.perf_counter()
            raw2 = load_source("cifar10", full=True, cache=d)
            cached.append(time.perf_counter() - t0)
        same = bool(torch.equal(raw.train.x, raw2.train.x) and torch.equal(raw.test.y, raw2.test.y))
    out = {"first_load_s": round(first, 2), "cached_load_s": round(statistics.median(cached), 3),
           "num_train": len(raw.train), "num_test": len(raw.test), "cache_equal": same}
    print(f"first load {first:.2f} s (bar 30), from the cache {statistics.median(cached):.3f} s (bar 2); "
          f"{len(raw.train)} + {len(raw.test)} images; cached arrays equal: {same}")
    return out


def _eval_fast(model, data, amp: bool) -> float:
    from backdoorlab.train import evaluate

    if not amp:
        return evaluate(model, data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return evaluate(model, data)


# each attack at 10% of the training set, all-to-one -> 0, in the settings of configs/grids/seed003_cifar10.yaml
# and configs/attacks/*_cifar10.yaml (SIG is clean-label: all 5,000 target-class images = 10% of the set)
ATTACK_SETTINGS: dict[str, dict] = {
    "badnets": {"size": 3},
    "blend": {},
    "sig": {"mode": "clean-label", "rate": 1.0, "delta": 0.1176, "freq": 6},
    "wanet": {"k": 4, "s": 0.5, "cross_ratio": 2.0},
    # fastnet evaluates with flip TTA: the triggers must go through the recipe's flips (input_aware.py)
    "input-aware": {"cross_ratio": 1.0, "mask_epochs": 2, "width": 16, "depth": 3, "augment_triggers": True},
    # seed 003's clean-label (configs/attacks/clean-label_cifar10.yaml): half the airplanes (2,500, 5% of the
    # set) made hard by PGD on a vgg-small surrogate, then four 3x3 corner checkerboards
    "clean-label": {"mode": "clean-label", "rate": 0.5, "eps": 0.0627, "steps": 10, "norm": "linf", "size": 3,
                    "pattern": "checkerboard", "corners": "four", "surrogate": "vgg-small", "surrogate_epochs": 6},
}


def _config(args, attack: str | None = None):
    from backdoorlab.config import load_config

    over = [f"seed={args.seed}", f"train.epochs={args.epochs}"]
    if args.subset:
        over.append("data.full=false")
    if attack:
        over += [f"attack.name={attack}", "attack.rate=0.1", "attack.target=0"]
        over += [f"attack.{k}={v}" for k, v in ATTACK_SETTINGS.get(attack, {}).items()]
    over += getattr(args, "set", [])  # the user's --set last: it wins over the attack's settings
    doc_path = ROOT / "configs" / "fastnet_cifar10.yaml"
    if attack:
        import yaml

        from backdoorlab.config import ExperimentConfig, apply_overrides

        doc = yaml.safe_load(doc_path.read_text())
        doc["attack"] = {"name": attack}
        doc = apply_overrides(doc, over)
        if getattr(args, "recipe_surrogate", False):  # the surrogate is the victim's model, trained by its recipe
            rec = {k: v for k, v in doc["train"].items() if k not in ("epochs", "lr")}
            doc["attack"].update(surrogate=doc["model"]["name"], surrogate_epochs=doc["train"]["epochs"],
                                 surrogate_lr=doc["train"]["lr"], surrogate_recipe=rec)
        return ExperimentConfig.model_validate(doc)
    return load_config(doc_path, over)


def part_train(args, attack: str | None = None) -> dict:
    from backdoorlab.attacks.base import TrainingAttack
    from backdoorlab.experiment import _train_with_training_attack, evaluate_victim, prepare, setup_torch
    from backdoorlab.models import ModelSpec, build_model
    from backdoorlab.train import evaluate, train

    cfg = _config(args, attack)
    setup_torch(cfg)
    t0 = time.perf_counter()
    prep = prepare(cfg)
    load_s = time.perf_counter() - t0
    data, test = prep.train_set, prep.splits.test
    training_set = data.without_ground_truth() if hasattr(data, "without_ground_truth") else data
    torch.manual_seed(cfg.seed)
    model = build_model(ModelSpec("fastnet", data.num_classes, data.shape, cfg.model.extras()))
    amp = bf16_autocast_supported() and cfg.train.autocast != "off"
    curve: list[dict] = []
    clock = {"train": 0.0}

    def cb(event, **info):
        if event != "epoch_end":
            return
        st = info["stats"]
        clock["train"] += st.seconds
        row = {"epoch": st.epoch, "train_s": round(clock["train"], 1), "loss": round(st.loss, 4)}
        if st.epoch >= args.curve_from or st.epoch == cfg.train.epochs:
            te = time.perf_counter()
            row["ca"] = round(_eval_fast(model, test, amp), 4)
            row["eval_s"] = round(time.perf_counter() - te, 1)
            model.train()
        curve.append(row)
        print("  ", json.dumps(row), flush=True)

    # the trainer's set-up before the first epoch (the whitening init) is counted in the curve's clock
    t0 = time.perf_counter()
    if isinstance(prep.attack, TrainingAttack):  # input-aware: it poisons while training (the runner's path)
        model, hist_d, _ = _train_with_training_attack(cfg, prep, model, (cb,))  # the model the curve evaluates
        img_s = [e["images_per_second"] for e in hist_d["epochs"]]
    else:
        hist = train(model, training_set, cfg.train, seed=cfg.seed, callbacks=(cb,))
        img_s = [e.images_per_second for e in hist.epochs]
    wall = time.perf_counter() - t0
    if attack and prep.triggered_test is None:
        raise SystemExit(f"{attack}: no triggered test set after training; the attack did not run")
    setup_s = wall - clock["train"] - sum(r.get("eval_s", 0) for r in curve)
    for r in curve:
        r["train_s"] = round(r["train_s"] + setup_s, 1)
    tta = {}
    for bar in (0.90, 0.92, 0.94):
        hit = next((r for r in curve if r.get("ca", 0) >= bar), None)
        tta[f"{bar:.2f}"] = None if hit is None else {"epoch": hit["epoch"], "seconds": hit["train_s"]}
    t0 = time.perf_counter()
    if attack:
        metrics = evaluate_victim(model, prep, cfg.train.eval_batch_size)
    else:
        metrics = {"clean_accuracy": evaluate(model, test)}
    final_eval_s = time.perf_counter() - t0
    out = {"config": "configs/fastnet_cifar10.yaml", "attack": attack, "seed": cfg.seed, "epochs": cfg.train.epochs,
           "num_train": len(data), "num_test": len(test), "data_s": round(load_s, 1), "train_s": round(wall - sum(
               r.get("eval_s", 0) for r in curve), 1), "bf16": amp, "curve": curve, "time_to": tta,
           "final_fp32": {k: round(float(v), 4) for k, v in metrics.items() if isinstance(v, (int, float))},
           "final_eval_s": round(final_eval_s, 1), "img_per_s": round(statistics.median(img_s))}
    print(json.dumps({k: v for k, v in out.items() if k != "curve"}))
    if args.save:
        from backdoorlab.models import save_model

        save_model(model, Path(args.save))
        if isinstance(prep.attack, TrainingAttack):  # its trigger is not stored: keep the triggered test set
            _save_triggered(prep.triggered_test, Path(args.save))
    if args.strip and attack:
        out["strip"] = _strip(model, prep, cfg, args.strip_n, args.superimpose, args.strip_samples)
        print("   strip:", json.dumps(out["strip"]))
    return out


def _triggered_path(model_file: Path) -> Path:
    return model_file.with_name(model_file.stem + ".triggered.safetensors")


def _save_triggered(trig, model_file: Path) -> None:
    """A training-time attack's triggered test set beside its victim (``repair --load`` reads it)."""
    from safetensors.torch import save

    from backdoorlab.atomic import atomic_write_bytes

    atomic_write_bytes(_triggered_path(model_file), save(
        {"x": trig.x.contiguous(), "y": trig.y, "y_source": trig.y_source, "is_poison": trig.is_poison}))


def _load_triggered(prep, model_file: Path) -> None:
    """``prep.triggered_test`` from the file :func:`_save_triggered` wrote (a training-time attack)."""
    from safetensors.torch import load_file

    from backdoorlab.types import PoisonedSet

    path = _triggered_path(model_file)
    if not path.is_file():
        raise SystemExit(f"{path}: not found; a training-time attack's victim needs the triggered test set that "
                         "`attack --save` writes beside it")
    t, test = load_file(str(path)), prep.splits.test
    prep.triggered_test = PoisonedSet(t["x"], t["y"], test.num_classes, test.class_names, "triggered-test",
                                      is_poison=t["is_poison"], y_source=t["y_source"])


def _strip(model, prep, cfg, n: int | None = None, superimpose: str = "sum", samples: int = 20) -> dict:
    """STRIP (FRR preset 1% on the clean holdout) on the first ``n`` clean and triggered test images."""
    from backdoorlab.defenses import DEFENSES
    from backdoorlab.train import predict

    det = DEFENSES.create("strip", frr=0.01, superimpose=superimpose, samples=samples)
    t0 = time.perf_counter()
    det.fit(model, prep.splits.holdout)
    clean = det.detect(prep.splits.test.x[:n]).flagged
    trig = det.detect(prep.triggered_test.x[:n]).flagged
    out = {"holdout": len(prep.splits.holdout), "clean": int(clean.numel()), "triggered": int(trig.numel()),
           "frr": round(float(clean.float().mean()), 4), "far": round(1 - float(trig.float().mean()), 4),
           "seconds": round(time.perf_counter() - t0, 1)}
    # STRIP detects a trigger that dominates the prediction: split the FAR by whether the trigger fired
    # (the victim predicts the target on the triggered image). The passed non-firing share is a floor
    # no superimposition can lower unless STRIP flags triggers that do not fire.
    fired = predict(model, prep.triggered_test.x[:n]) == prep.triggered_test.y[:n]
    passed = ~trig
    out.update({"fired": round(float(fired.float().mean()), 4),
                "far_fired": round(float(passed[fired].float().mean()), 4) if bool(fired.any()) else None,
                "far_not_fired": round(float(passed[~fired].float().mean()), 4) if bool((~fired).any()) else None,
                "far_floor_from_not_fired": round(float((passed & ~fired).float().mean()), 4)})
    return out


def part_strip(args) -> dict:
    """STRIP on a victim saved by ``attack --save``: the same data (seeded), the model from the file."""
    from backdoorlab.attacks.base import TrainingAttack
    from backdoorlab.experiment import evaluate_victim, prepare, setup_torch
    from backdoorlab.models import load_model

    cfg = _config(args, args.attack)
    setup_torch(cfg)
    prep = prepare(cfg)
    model = load_model(Path(args.load), num_classes=10, input_shape=(3, 32, 32))
    if args.no_tta:
        model.tta = False
    out = {"attack": args.attack, "seed": cfg.seed, "model": args.load, "superimpose": args.superimpose,
           "tta": not args.no_tta}
    if not args.no_eval:
        out["victim"] = {k: round(float(v), 4) for k, v in evaluate_victim(model, prep).items()}
    out["strip_samples"] = args.strip_samples
    out["strip"] = _strip(model, prep, cfg, args.strip_n, args.superimpose, args.strip_samples)
    print(json.dumps(out))
    return out


def part_repair(args) -> dict:
    """Repairers on a victim saved by ``attack --save`` (issues 25 and 26): the same data (seeded), the
    runner's path (the clean held-out set, CA / ASR / DER), as ``bench_repairers.py`` on MNIST."""
    from bench_repairers import parse_params, repair_all

    from backdoorlab.attacks.base import TrainingAttack
    from backdoorlab.experiment import evaluate_victim, prepare, setup_torch
    from backdoorlab.models import load_model

    cfg = _config(args, args.attack)
    setup_torch(cfg)
    prep = prepare(cfg)
    model = load_model(Path(args.load), num_classes=10, input_shape=(3, 32, 32)).eval()
    if isinstance(prep.attack, TrainingAttack):
        _load_triggered(prep, Path(args.load))
    base = {k: float(v) for k, v in evaluate_victim(model, prep).items()}
    print(f"   victim {args.load}: CA {base['clean_accuracy']:.4f}  ASR {base['attack_success_rate']:.4f}; "
          f"{len(prep.splits.holdout)} clean held-out images", flush=True)
    rows = repair_all(prep, model, base, args.repairers.split(","), parse_params(args.param), cfg.seed)
    out = {"attack": args.attack, "seed": cfg.seed, "model": args.load, "holdout": len(prep.splits.holdout),
           "victim": {k: round(v, 4) for k, v in base.items()},
           "repairers": {k: {m: (round(float(x), 4) if isinstance(x, (int, float)) else x) for m, x in r.items()
                             if isinstance(x, (int, float, str))} for k, r in rows.items()}}
    print(json.dumps(out))
    return out


# ABL's own parameters taken from the recipe (the rest of the recipe is ABL's ``recipe``)
_ABL_OWN = ("lr", "batch_size", "momentum", "weight_decay", "crop_padding", "flip", "optimizer", "eval_batch_size")


def abl_params(cfg, epochs: int, overrides: dict) -> dict:
    """ABL trained with the fastnet recipe: ABL's own parameters from the recipe, the rest of the
    recipe as ABL's ``recipe`` (isolation at a constant rate with a one-epoch warm-up), the paper's
    gamma 0.5 and unlearning rate 5e-4, one loss pass per isolation epoch (47,500 images each)."""
    tr = cfg.train.model_dump()
    recipe = {k: v for k, v in tr.items() if k not in (*_ABL_OWN, "epochs", "step_size")}
    recipe["warmup"] = 1.0
    params = {**{k: tr[k] for k in _ABL_OWN}, "recipe": recipe, "epochs": epochs, "isolation_epochs": 2,
              "gamma": 0.5, "unlearning_lr": 5e-4, "unlearning_epochs": 5, "passes_per_epoch": 1, "seed": cfg.seed}
    for k, v in overrides.items():
        if k.startswith("recipe."):
            params["recipe"][k.split(".", 1)[1]] = v
        else:
            params[k] = v
    return params


def _abl_overrides(param: list[str]) -> dict:
    """``-p abl.KEY=V`` / ``-p abl.recipe.KEY=V`` as ``abl_params`` overrides (KEY, recipe.KEY)."""
    from bench_repairers import parse_params

    over: dict = {}
    for name, kv in parse_params(param).items():
        if name == "abl" or name.startswith("abl."):
            over.update({(f"{name[4:]}.{k}" if name != "abl" else k): v for k, v in kv.items()})
    return over


def part_abl(args) -> dict:
    """ABL (seed 003's setting) on the full set with the fastnet recipe, through the runner's path: the
    undefended victim from ``--load`` (saved by ``attack --save``), ABL training a fresh fastnet."""
    from backdoorlab.defenses import DEFENSES
    from backdoorlab.experiment import evaluate_victim, prepare, run_defense, setup_torch
    from backdoorlab.models import load_model

    cfg = _config(args, args.attack)
    setup_torch(cfg)
    prep = prepare(cfg)
    if args.load:
        model = load_model(Path(args.load), num_classes=10, input_shape=(3, 32, 32)).eval()
        base = {k: float(v) for k, v in evaluate_victim(model, prep).items()}
        print(f"   victim {args.load}: CA {base['clean_accuracy']:.4f}  ASR {base['attack_success_rate']:.4f}; "
              f"{int(base.get('poison_count', 0))} poisoned of {len(prep.train_set)}", flush=True)
    else:  # no undefended victim: ABL alone (e.g. its isolation phase: -p abl.epochs=2 -p abl.unlearning_epochs=0)
        from backdoorlab.models import ModelSpec, build_model

        model, base = build_model(ModelSpec("fastnet", 10, (3, 32, 32), cfg.model.extras())), {}
        print(f"   no victim loaded; {len(prep.train_set)} training images", flush=True)
    params = abl_params(cfg, args.epochs, _abl_overrides(args.param))
    defense = DEFENSES.build("abl", params, where="abl")
    handler = logging.StreamHandler(sys.stdout)  # ABL's phase and unlearning-epoch lines (CA / ASR / held-out per epoch)
    handler.setFormatter(logging.Formatter("   %(message)s"))
    abl_log = logging.getLogger("backdoorlab.defenses.abl")
    abl_log.addHandler(handler)
    abl_log.setLevel(logging.INFO)
    print(f"   abl parameters: {params}", flush=True)
    t0 = time.perf_counter()
    m, _figs = run_defense(defense, model, prep, base.get("clean_accuracy"), base.get("attack_success_rate"),
                           cfg.train.eval_batch_size, seed=cfg.seed)
    secs = time.perf_counter() - t0
    keep = ("clean_accuracy", "attack_success_rate", "isolation_precision", "poison_recall_top_0.05",
            "poison_recall_top_0.1", "poison_recall_top_0.2", "isolation.clean_accuracy",
            "isolation.attack_success_rate", "training.clean_accuracy", "training.attack_success_rate")
    print("   " + "  ".join(f"{k} {m[k]:.4f}" for k in keep if k in m) + f"  ({secs:.0f} s)", flush=True)
    out = {"attack": args.attack, "seed": cfg.seed, "model": args.load, "victim": {k: round(v, 4) for k, v in base.items()},
           "abl_params": params, "abl": {k: round(float(v), 4) for k, v in m.items() if isinstance(v, (int, float))},
           "seconds": round(secs, 1)}
    print(json.dumps(out, default=str))
    return out


def part_isolation(args) -> dict:
    """ABL's isolation phase alone, watched: after every LGA epoch (``abl_params`` with ``--epochs``
    isolation epochs at a constant rate), each training sample's loss (the isolation pass), and how
    well it separates the poisoned samples (ground truth, for the diagnosis only): precision of the
    lowest ``isolation_ratio`` (ABL's isolated share, 1%) by the last pass and by ABL's own isolation score over the
    passes so far (``isolation_score``, ``passes_per_epoch``), AUROC of the loss overall and within the target class, the
    classes of the lowest 1%, and CA / ASR on the first 2,000 test / triggered test images. The
    ``_classnorm`` precisions rank by the log loss minus its class's median (a candidate fix of the
    class bias, not in ABL)."""
    from isolation_rules import class_centred
    from sklearn.metrics import roc_auc_score

    from backdoorlab.defenses import DEFENSES
    from backdoorlab.defenses._abl_losses import lga_loss
    from backdoorlab.experiment import prepare, setup_torch
    from backdoorlab.models import ModelSpec, build_model
    from backdoorlab.train import evaluate, train

    cfg = _config(args, args.attack)
    setup_torch(cfg)
    prep = prepare(cfg)
    data, truth = prep.train_set, prep.train_set.is_poison
    params = abl_params(cfg, args.epochs, {"isolation_epochs": args.epochs, "unlearning_epochs": 0,
                                           **_abl_overrides(args.param)})
    abl = DEFENSES.build("abl", params, where="abl")
    k = int(round(abl.isolation_ratio * len(data)))  # ABL's isolated share
    tc = abl._train_config(args.epochs, "constant")
    print(f"   {int(truth.sum())} poisoned of {len(data)}; isolating {k}; lga {abl.lga}, gamma {abl.gamma:g}, "
          f"lr {tc.lr:g}, batch {tc.batch_size}", flush=True)
    model = build_model(ModelSpec("fastnet", 10, (3, 32, 32), cfg.model.extras()))
    amp = abl._autocast(model)
    n_eval = min(2000, len(prep.splits.test), len(prep.triggered_test))
    test = prep.splits.test.subset(torch.arange(n_eval), name="test")
    trig = prep.triggered_test.subset(torch.arange(n_eval), name="triggered")
    target = int(data.y[truth][0]) if bool(truth.any()) else 0
    in_target = data.y == target
    passes: list[tuple[float, torch.Tensor]] = []  # (epoch, losses), recorded by ABL's own callback
    record = abl._pass_recorder(model, data, 1024, amp, passes)
    rows: list[dict] = []
    t0 = time.perf_counter()

    def auroc(pos: torch.Tensor, score: torch.Tensor) -> float | None:
        return round(float(roc_auc_score(pos.numpy(), score.numpy())), 4) if 0 < int(pos.sum()) < pos.numel() else None

    def precision(score: torch.Tensor) -> float:
        return round(float(truth[torch.argsort(score, stable=True)[:k]].float().mean()), 4)

    def class_normalised(score: torch.Tensor) -> torch.Tensor:
        """log score minus its class's median log score (labels as given): a shift of a whole class's
        losses (the class bias of the last steps) cancels, a low tail within a class stays."""
        return class_centred(score.clamp_min(1e-12).log()[None], data.y)[0]

    def watch(event: str, **info) -> None:  # after ABL's recorder: passes[-1] is this epoch's end
        if event != "epoch_end":
            return
        loss = passes[-1][1]
        with amp():
            ca, asr = evaluate(model, test), evaluate(model, trig)
        epoch = len(rows) + 1
        score = abl._isolation_score(passes) if epoch > 1 else loss  # ABL's rule on the passes so far
        low = torch.argsort(loss, stable=True)[:k]
        row = {"epoch": epoch, "seconds": round(time.perf_counter() - t0, 1), "ca": round(ca, 4), "asr": round(asr, 4),
               "mean_loss": round(float(loss.mean()), 4), "poison_loss": round(float(loss[truth].mean()), 4),
               "precision_last": precision(loss), f"precision_{abl.isolation_score}": precision(score),
               "precision_last_classnorm": precision(class_normalised(loss)),
               f"precision_{abl.isolation_score}_classnorm": precision(class_normalised(score)),
               "auroc": auroc(truth, -loss), "auroc_in_target": auroc(truth[in_target], -loss[in_target]),
               "lowest_by_class": torch.bincount(data.y[low], minlength=data.num_classes).tolist()}
        rows.append(row)
        print("   " + "  ".join(f"{k_} {v}" for k_, v in row.items()), flush=True)

    gamma, per_sample = abl.gamma, abl.lga == "sample"
    train(model, data, tc, seed=abl.seed, loss_fn=lambda logits, y: lga_loss(logits, y, gamma, per_sample),
          callbacks=(record, watch))
    if args.save_passes:  # every loss pass with the ground truth: scoring rules compared offline (isolation_rules.py)
        from safetensors.torch import save

        from backdoorlab.atomic import atomic_write_bytes
        tensors = {"losses": torch.stack([loss for _, loss in passes]).float().contiguous(),
                   "epochs": torch.tensor([e for e, _ in passes], dtype=torch.float32),
                   "is_poison": truth.to(torch.uint8).contiguous(), "labels": data.y.contiguous()}
        atomic_write_bytes(Path(args.save_passes), save(tensors))
        print(f"   {len(passes)} loss passes written to {args.save_passes}", flush=True)
    return {"attack": args.attack, "seed": cfg.seed, "abl_params": params, "epochs": rows}


def part_epoch(args) -> dict:
    from backdoorlab.models import ModelSpec, build_model
    from backdoorlab.train import _memory_format

    out = {}
    n_train, bs = 47_500, 512
    for name in ("fastnet", "preact-resnet18"):
        for amp in ((False, True) if bf16_autocast_supported() else (False,)):
            torch.manual_seed(0)
            m = build_model(ModelSpec(name, 10, (3, 32, 32), {}))
            fmt = _memory_format(m, True)
            m.to(memory_format=fmt).train()
            opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)
            x = torch.rand(bs, 3, 32, 32).contiguous(memory_format=fmt)
            y = torch.randint(0, 10, (bs,))
            times = []
            for i in range(args.batches + 2):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    logits = m(x)
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            per = statistics.median(times)
            key = f"{name} {'bf16' if amp else 'fp32'}"
            out[key] = {"img_per_s": round(bs / per), "s_per_epoch": round(per * n_train / bs, 1)}
            print(f"   {key:24s} {bs / per:7.0f} img/s  {per * n_train / bs:7.1f} s/epoch (47,500 images, batch {bs})", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("part", choices=["load", "train", "epoch", "attack", "strip", "repair", "abl", "isolation"])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subset", action="store_true", help="the 10,000-image npz subset instead of the full set")
    ap.add_argument("--curve-from", type=int, default=5, help="first epoch evaluated for the curve")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the recipe, e.g. --set train.label_smoothing=0 (repeatable)")
    ap.add_argument("--attack", choices=sorted(ATTACK_SETTINGS), default="badnets")
    ap.add_argument("--recipe-surrogate", action="store_true",
                    help="attack --attack clean-label: PGD on the victim's model trained by the recipe (not vgg-small)")
    ap.add_argument("--strip", action="store_true")
    ap.add_argument("--save", help="write the trained model here (.safetensors)")
    ap.add_argument("--load", help="strip, repair: the victim saved by `attack --save`")
    ap.add_argument("--save-passes", help="isolation: write every loss pass, labels and ground truth here (.safetensors)")
    ap.add_argument("--strip-n", type=int, default=None, help="strip: screen the first N clean and N triggered test images")
    ap.add_argument("--no-eval", action="store_true", help="strip: skip the victim's CA / ASR")
    ap.add_argument("--superimpose", choices=["sum", "add", "average"], default="sum", help="strip: STRIP's blend")
    ap.add_argument("--strip-samples", type=int, default=20, help="strip: superimpositions per input (N)")
    ap.add_argument("--no-tta", action="store_true", help="strip: screen with the model's flip TTA off")
    ap.add_argument("--repairers", default="fine-pruning,fine-tuning,nad,anp,i-bau,clp,nc-unlearning",
                    help="repair: repairers by name, or name:key=value:... variants, comma-separated")
    ap.add_argument("-p", "--param", action="append", default=[], metavar="NAME.KEY=VALUE",
                    help="repair: a repairer's parameter, e.g. -p fine-tuning.lr=0.05 (repeatable)")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args()
    need_shared()
    os.environ.setdefault("BACKDOORLAB_DATA", str(need_shared()))
    header(f"bench_cifar_full {args.part}")
    print(f"   cpu kind: {_cpu()}")
    if args.part == "load":
        res = part_load(args)
    elif args.part == "train":
        res = part_train(args)
    elif args.part == "epoch":
        res = part_epoch(args)
    elif args.part == "strip":
        res = part_strip(args)
    elif args.part == "repair":
        res = part_repair(args)
    elif args.part == "abl":
        res = part_abl(args)
    elif args.part == "isolation":
        res = part_isolation(args)
    else:
        res = part_train(args, attack=args.attack)
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps({"part": args.part, "cpu": _cpu(), "overrides": args.set, **res}) + "\n")


if __name__ == "__main__":
    main()
