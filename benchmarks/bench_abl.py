"""Anti-Backdoor Learning bars: undefended CA/ASR vs ABL CA/ASR, and isolation precision at 1%.

Each attack runs through the experiment runner's own path (``experiment.prepare``,
``train_victim``, ``run_defense`` with ``defenses: [{name: abl}]``): the undefended victim is
normal training on the poisoned set, ABL trains a fresh model of the same architecture in its place.
Attack settings are the working ones of ``configs/attacks/<attack>_mnist5k.yaml`` (or
``_cifar10.yaml``), applied to the larger data.

- ``--data mnist``: MNIST from ``shared/data`` (the full 10,000-image test set; a stratified
  ``--train-size`` subset of the 57,000 training images, 20,000 by default, to fit a shared 2-core
  CPU), the small CNN. Bars (issue 7): ASR <= 5%, CA within 3 points of the undefended victim,
  isolation precision >= 90% at 1% isolation, for badnets, blend, sig and clean-label.
- ``clean`` (an attack name here): the badnets experiment without its attack; bar (issue 7, both data
  sets): ABL costs at most 2 points of CA against normal training.
- ``--data cifar10``: the 10,000-image CIFAR-10 subset, vgg-small with crop + flip; reported beside
  BackdoorBench's PreAct-ResNet18 ABL figures (no bar).
- ``input-aware``: a training-time attack; after it has trained its victim, its trigger generator
  stamps a fixed ``rate`` of the training set (dynamic triggers, relabelled to the target) so that
  ABL has a poisoned data set to train on (no cross-trigger samples in that set). No bar.

    OMP_NUM_THREADS=1 python benchmarks/bench_abl.py [--data mnist|cifar10] [--attacks badnets,blend,sig,clean-label]
        [--train-size 20000] [--set ATTACK:KEY=VALUE ...] [--param NAME=VALUE ...] [--figures DIR] [--json FILE]

``--set`` changes one attack's experiment config (dotted keys, as ``backdoorlab run --set``), e.g.
``--set sig:attack.rate=0.8`` (the full-MNIST SIG rate of ``bench_attacks.py``) or
``--set clean-label:attack.eps=0.3``; ``--param`` changes ABL's parameters for every attack.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import yaml

from _common import ROOT, SHARED_DATA, header, need_shared

from backdoorlab.attacks.base import Attack, TrainingAttack, poison
from backdoorlab.config import ExperimentConfig, apply_overrides
from backdoorlab.defenses import DEFENSES
from backdoorlab.experiment import evaluate_victim, prepare, run_defense, train_victim
from backdoorlab.store import atomic_write_bytes, atomic_write_json

BARS = {"asr": 0.05, "ca_drop": 0.03, "precision": 0.90, "clean_ca_drop": 0.02}
# BackdoorBench (PreAct-ResNet18, CIFAR-10, 10% poisoned) ABL: CA / ASR
PEER = {"badnets": (0.833, 0.000), "blend": (0.773, 0.007), "sig": (0.578, 0.000)}
# ABL paper (ResNet-34 / WRN-16-1, CIFAR-10): BadNets CA 86.11 / ASR 3.04; seed 003: clean-label 89/6, SIG 89/5
PAPER = {"badnets": (0.8611, 0.0304), "clean-label": (0.89, 0.06), "sig": (0.89, 0.05)}


class GeneratorTrigger(Attack):
    """A trained input-aware trigger generator used as a fixed data-poisoning trigger."""

    modes = ("all-to-one",)

    def __init__(self, trigger) -> None:
        self.trigger = trigger

    def apply_trigger(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.trigger(x)

    def describe(self) -> str:
        return "input-aware generator (fixed)"


def experiment_config(data: str, attack: str, train_size: int | None, epochs: int, seed: int,
                      overrides: list[str] = ()) -> ExperimentConfig:
    if attack == "clean":  # no poison: the badnets experiment without its attack
        attack, overrides = "badnets", ["attack=null", *overrides]
    name = f"{attack}_{'cifar10' if data == 'cifar10' else 'mnist5k'}.yaml"
    path = ROOT / "configs" / "attacks" / name
    doc = yaml.safe_load((path if path.is_file() else ROOT / "configs" / name).read_text())
    doc["data"] = {"name": data, "root": str(SHARED_DATA), "holdout_fraction": 0.05,
                   **({"train_size": train_size} if train_size else {})}
    doc["train"] = {**doc.get("train", {}), "epochs": epochs}
    doc["seed"] = seed
    doc["cache"] = False
    doc["threads"] = torch.get_num_threads()
    return ExperimentConfig.model_validate(apply_overrides(doc, list(overrides)))


def poison_with_generator(cfg: ExperimentConfig, prep, model_res) -> None:
    """Input-aware: stamp ``rate`` of the training set with the victim's trigger generator."""
    a = cfg.attack
    prep.train_set = poison(prep.splits.train, GeneratorTrigger(model_res.trigger), rate=a.rate, target=a.target,
                            mode=a.mode, generator=torch.Generator().manual_seed(cfg.seed + 1))


def run_one(data: str, attack: str, args, abl_params: dict, figures: Path | None) -> dict:
    sets = [o.partition(":")[2] for o in args.set if o.partition(":")[0] == attack]
    cfg = experiment_config(data, attack, args.train_size, args.epochs, args.seed, sets)
    t0 = time.perf_counter()
    prep = prepare(cfg)
    if isinstance(prep.attack, TrainingAttack):
        a = cfg.attack
        torch.manual_seed(cfg.seed)
        from backdoorlab.models import ModelSpec, build_model

        tr = prep.splits.train
        res = prep.attack.train_victim(build_model(ModelSpec(cfg.model.name, tr.num_classes, tr.shape, cfg.model.extras())),
                                       tr, cfg.train, rate=a.rate, target=a.target, source=a.source, mode=a.mode, seed=cfg.seed)
        model = res.model
        prep.triggered_test = res.triggered_test(prep.splits.test, target=a.target, source=a.source, mode=a.mode,
                                                 generator=torch.Generator().manual_seed(cfg.seed + 2))
        poison_with_generator(cfg, prep, res)
    else:
        torch.manual_seed(cfg.seed)
        model, _hist, _cached = train_victim(cfg, prep, None)
    t_victim = time.perf_counter() - t0
    before = evaluate_victim(model, prep, cfg.train.eval_batch_size)
    defense = DEFENSES.build("abl", abl_params, where="abl")
    m, figs = run_defense(defense, model, prep, before["clean_accuracy"], before.get("attack_success_rate"),
                          cfg.train.eval_batch_size, seed=cfg.seed)
    row = {
        "data": data, "attack": attack, "attack_config": cfg.attack and cfg.attack.model_dump(),
        "model": cfg.model.name,
        "train_size": len(prep.train_set), "holdout_size": len(prep.splits.holdout), "test_size": len(prep.splits.test),
        "poison_count": before.get("poison_count"), "epochs_victim": cfg.train.epochs, "seed": cfg.seed,
        "victim": {"clean_accuracy": before["clean_accuracy"], "attack_success_rate": before.get("attack_success_rate"),
                   "seconds": t_victim},
        "abl": m, "abl_params": defense.__dict__ if hasattr(defense, "__dict__") else abl_params,
    }
    if figures is not None:
        for k, png in figs.items():
            atomic_write_bytes(figures / f"abl_{data}_{attack}_{k}.png", png)
    return row


def verdict(row: dict) -> str:
    ca0, asr0 = row["victim"]["clean_accuracy"], row["victim"]["attack_success_rate"]
    m = row["abl"]
    if row["attack"] == "clean":
        return "MET" if ca0 - m["clean_accuracy"] <= BARS["clean_ca_drop"] else "not met (CA)"
    ok = (m["attack_success_rate"] <= BARS["asr"], ca0 - m["clean_accuracy"] <= BARS["ca_drop"],
          m.get("isolation_precision", 0.0) >= BARS["precision"])
    return "MET" if all(ok) else "not met (" + ", ".join(n for n, o in zip(("ASR", "CA", "precision"), ok) if not o) + ")"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="mnist", choices=["mnist", "cifar10"])
    ap.add_argument("--attacks", default="badnets,blend,sig,clean-label")
    ap.add_argument("--train-size", type=int, default=20000, help="stratified training subset (0: all)")
    ap.add_argument("--epochs", type=int, default=None, help="victim epochs (default: 5 mnist, 12 cifar10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--param", action="append", default=[], help="abl parameter NAME=VALUE (repeatable)")
    ap.add_argument("--set", action="append", default=[], metavar="ATTACK:KEY=VALUE",
                    help="config override for one attack's experiment, e.g. clean-label:attack.eps=0.3 (repeatable)")
    ap.add_argument("--figures", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="append the rows (JSON lines) to this file")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    need_shared()
    header(f"bench_abl {args.data}")
    args.train_size = args.train_size or None
    if args.epochs is None:
        args.epochs = 12 if args.data == "cifar10" else 5
    abl_params = {"isolation_epochs": 4, "epochs": args.epochs + 4} if args.data == "mnist" else \
        {"isolation_epochs": 5, "epochs": args.epochs + 5, "crop_padding": 4, "flip": True,
         "unlearning_lr": 5e-4}  # the paper's rate: 5e-3 (the MNIST default) collapses vgg-small to CA 0.10
    for item in args.set:
        name, sep, kv = item.partition(":")
        if not sep or "=" not in kv or name not in args.attacks.split(","):
            raise SystemExit(f"--set {item!r}: expected ATTACK:KEY=VALUE with ATTACK one of --attacks "
                             f"({args.attacks}), e.g. sig:attack.rate=0.8")
    for item in args.param:
        k, _, v = item.partition("=")
        abl_params[k] = yaml.safe_load(v)
    print(f"   abl parameters: {abl_params}")
    print(f"   {'attack':12s} {'poisoned':>8s} {'CA0':>7s} {'ASR0':>7s} | {'iso':>7s} {'CA_iso':>7s} {'ASR_iso':>7s} | "
          f"{'CA_tr':>7s} {'ASR_tr':>7s} | {'CA':>7s} {'ASR':>7s} {'dCA':>7s} {'secs':>6s}  verdict")
    for attack in args.attacks.split(","):
        row = run_one(args.data, attack, args, abl_params, args.figures)
        m, v = row["abl"], row["victim"]
        g = lambda k: m.get(k, float("nan"))  # noqa: E731
        bar = verdict(row) if attack == "clean" or (args.data == "mnist" and attack != "input-aware") else "reported"
        peer = PEER.get(attack) if args.data == "cifar10" else PAPER.get(attack)
        print(f"   {attack:12s} {int(row['poison_count'] or 0):8d} {v['clean_accuracy']:7.4f} {v['attack_success_rate'] or float('nan'):7.4f} | "
              f"{g('isolation_precision'):7.4f} {g('isolation.clean_accuracy'):7.4f} {g('isolation.attack_success_rate'):7.4f} | "
              f"{g('training.clean_accuracy'):7.4f} {g('training.attack_success_rate'):7.4f} | "
              f"{g('clean_accuracy'):7.4f} {g('attack_success_rate'):7.4f} {v['clean_accuracy'] - g('clean_accuracy'):+7.4f} "
              f"{g('seconds'):6.0f}  {bar}" + (f"   (peer CA/ASR {peer[0]:.3f}/{peer[1]:.3f})" if peer else ""), flush=True)
        if args.json is not None:
            prev = args.json.read_text() if args.json.is_file() else ""
            atomic_write_bytes(args.json, (prev + json.dumps(row, default=str, sort_keys=True) + "\n").encode())


if __name__ == "__main__":
    main()
