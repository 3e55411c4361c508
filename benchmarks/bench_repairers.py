"""Repairers on backdoored victims (issue 25): CA / ASR / DER after each repairer, a clean model's
CA cost, CLP's data-free time, and the foreign TorchScript case.

    BACKDOORLAB_DATA=../shared/data python benchmarks/bench_repairers.py [--data mnist]
        [--attacks badnets,blend,sig,wanet,input-aware] [--repairers fine-tuning,...] [--clean-model]
        [--foreign] [--history] [-p nad.lr=0.05 ...] [--store DIR] [--json OUT]

Each victim is the attack picked by name alone (its declared defaults for the data set, as
``benchmarks/bench_attack_defaults.py``; 10% poisoned where the attack poisons a share of all
classes), trained once and cached in the store; the repairers run through the runner's path
(:func:`backdoorlab.experiment.run_defense`: the clean held-out set, an evaluation callback, then
CA / ASR / DER with the truth), so the figures are those a YAML experiment or a grid cell reports.

``--foreign``: the blend victim exported to TorchScript, loaded back as a foreign model, repaired
with 500 clean held-out images (stratified), every repairer. Bars (issue 25): on BadNets FT, NAD,
ANP and i-BAU ASR <= 5% with <= 3 points of CA lost; ANP and i-BAU also on blend; CLP <= 2 s
data-free; <= 1 point CA lost on a clean model; foreign: two repairers ASR <= 5% with CA >= 0.93.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from _common import header

from backdoorlab.api.experiments import _config
from backdoorlab.defenses import DEFENSES
from backdoorlab.experiment import evaluate_victim, prepare, run_defense, setup_torch, train_victim
from backdoorlab.store import Store

REPAIRERS = ["fine-tuning", "fine-pruning", "nad", "anp", "i-bau", "clp", "nc-unlearning"]
SHORT = {"fine-tuning": "FT", "fine-pruning": "FP", "nad": "NAD", "anp": "ANP", "i-bau": "i-BAU", "clp": "CLP",
         "nc-unlearning": "NC"}


def parse_params(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for it in items:
        key, value = it.split("=", 1)
        name, param = key.rsplit(".", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a plain string, e.g. layer=fc1
        out.setdefault(name, {})[param] = parsed
    return out


def victim(data: str, attack: str | None, seed: int, store: Store):
    overrides = [f"data.name={data}", f"seed={seed}"] + ([f"attack.name={attack}"] if attack else ["attack=null"])
    cfg = _config(None, overrides)
    setup_torch(cfg)
    prep = prepare(cfg)
    model, _, cached = train_victim(cfg, prep, store)
    model.eval()
    return cfg, prep, model, evaluate_victim(model, prep)


def spec(entry: str, params: dict[str, dict]) -> tuple[str, dict]:
    """``name`` or ``name:key=value:...`` (a variant, e.g. ``fine-tuning:lr=0.1``) -> (name, parameters)."""
    name, *kv = entry.split(":")
    return name, {**params.get(name, {}), **parse_params([f"{name}.{x}" for x in kv]).get(name, {})}


def short(entry: str) -> str:
    name, *kv = entry.split(":")
    return SHORT.get(name, name) + (f" ({', '.join(kv)})" if kv else "")


def repair_all(prep, model, base, repairers, params, seed) -> dict[str, dict]:
    rows = {}
    for entry in repairers:
        name, kw = spec(entry, params)
        d = DEFENSES.create(name, **kw)
        t0 = time.perf_counter()
        m, _ = run_defense(d, model, prep, base["clean_accuracy"], base.get("attack_success_rate"), 1024, {}, seed=seed)
        m["wall_seconds"] = time.perf_counter() - t0
        rows[entry] = m
        print(f"      {short(entry):6s} CA {m.get('clean_accuracy', float('nan')):.4f}  ASR {m.get('attack_success_rate', float('nan')):.4f}"
              f"  DER {m.get('der', float('nan')):.3f}  {m['wall_seconds']:.1f} s", flush=True)
    return rows


def clp_time(model) -> float:
    """Median wall time of CLP alone (data-free: no clean data, no evaluation), 5 runs."""
    d = DEFENSES.create("clp")
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        d.repair(model, None)
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[2]


def foreign(prep, model, repairers, params, seed, n_clean: int = 500) -> dict[str, dict]:
    from backdoorlab.data import stratified_indices
    from backdoorlab.evaluation import make_evaluator
    from backdoorlab.models import export_model, load_model

    hold = prep.splits.holdout
    _, idx = stratified_indices(hold.y, n_clean / len(hold), torch.Generator().manual_seed(seed))
    clean = hold.subset(idx[:n_clean], name="clean500")
    ev = make_evaluator(prep.splits.test, prep.triggered_test)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_model(model, Path(tmp) / "victim.pt")
        ts = load_model(path, num_classes=hold.num_classes, input_shape=hold.shape)
    before = ev(ts)
    print(f"   foreign TorchScript victim ({type(ts.module).__name__}), {len(clean)} clean images: "
          f"CA {before['clean_accuracy']:.4f} ASR {before['attack_success_rate']:.4f}", flush=True)
    rows = {}
    for entry in repairers:
        name, kw = spec(entry, params)
        t0 = time.perf_counter()
        try:
            res = DEFENSES.create(name, **kw).repair(ts, clean)
            m = {**ev(res.model), "seconds": time.perf_counter() - t0}
        except Exception as exc:  # noqa: BLE001 - a benchmark reports what fails
            m = {"error": f"{type(exc).__name__}: {exc}"}
        rows[entry] = m
        print(f"      {short(entry):6s} " + (f"CA {m['clean_accuracy']:.4f}  ASR {m['attack_success_rate']:.4f}  {m['seconds']:.1f} s"
                                           if "error" not in m else m["error"]), flush=True)
    return rows


def history(prep, model, repairers, params) -> dict[str, list]:
    """``--history``: each fine-tuning repairer's training, epoch by epoch (loss, accuracy on the clean
    held-out set it trains on): where a rate sends a victim to one class, this shows when."""
    rows = {}
    for entry in repairers:
        name, kw = spec(entry, params)
        res = DEFENSES.create(name, **kw).repair(model, prep.splits.holdout)
        epochs = res.details.get("history", {}).get("epochs", [])
        rows[entry] = [(round(e["loss"], 3), round(e["train_accuracy"], 3)) for e in epochs]
        print(f"      {short(entry):6s} epoch (loss, accuracy): {rows[entry]}", flush=True)
    return rows


def test_victim(repairers, params) -> dict[str, dict]:
    """The tests' BadNets victim (tests/_backdoored.py: 8,000 MNIST training images, 4 epochs, 2,000
    clean held-out), every repairer called directly with an evaluation callback."""
    import sys

    from backdoorlab.evaluation import make_evaluator

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _backdoored import victim as tests_victim

    v = tests_victim()
    ev = make_evaluator(v.test, v.triggered)
    print(f"   tests' victim: {ev(v.model)}, {len(v.holdout)} clean held-out images", flush=True)
    rows = {}
    for entry in repairers:
        name, kw = spec(entry, params)
        t0 = time.perf_counter()
        res = DEFENSES.create(name, **kw).repair(v.model, v.holdout, evaluate=ev)
        rows[entry] = {**ev(res.model), "seconds": time.perf_counter() - t0}
        print(f"      {short(entry):6s} CA {rows[entry]['clean_accuracy']:.4f}  ASR {rows[entry]['attack_success_rate']:.4f}"
              f"  {rows[entry]['seconds']:.1f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--attacks", default="badnets,blend,sig,wanet,input-aware")
    ap.add_argument("--repairers", default=",".join(REPAIRERS))
    ap.add_argument("--clean-model", action="store_true", help="also repair a clean model (CA cost)")
    ap.add_argument("--foreign", action="store_true", help="the blend victim as TorchScript, 500 clean images")
    ap.add_argument("-p", "--param", action="append", default=[], help="repairer.param=value")
    ap.add_argument("--test-victim", action="store_true", help="only the tests' small BadNets victim (tests/_backdoored.py)")
    ap.add_argument("--history", action="store_true", help="print each fine-tuning repairer's training epochs instead of CA / ASR")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", type=Path, default=Path("backdoorlab-runs/bench-repairers"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    header(f"repairers on {args.data}, seed {args.seed}")
    repairers = args.repairers.split(",")
    params = parse_params(args.param)
    if params:
        print(f"   parameters: {params}")
    out: dict = {"data": args.data, "seed": args.seed, "params": params, "attacks": {}}
    if args.test_victim:
        out["test_victim"] = test_victim(repairers, params)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1, default=float))
        return
    store = Store(args.store)
    victims = [a for a in args.attacks.split(",") if a] + (["none"] if args.clean_model else [])
    for attack in victims:
        cfg, prep, model, base = victim(args.data, None if attack == "none" else attack, args.seed, store)
        print(f"   {attack}: victim CA {base['clean_accuracy']:.4f}"
              + (f" ASR {base['attack_success_rate']:.4f}" if "attack_success_rate" in base else "")
              + f", {int(base['holdout_size'])} clean held-out images", flush=True)
        if args.history:
            out["attacks"][attack] = {"victim": base, "history": history(prep, model, repairers, params)}
            continue
        rows = repair_all(prep, model, base, repairers, params, args.seed)
        entry = {"victim": base, "repairers": rows}
        if attack == "badnets" and any(r.split(":")[0] == "clp" for r in repairers):
            entry["clp_seconds_data_free"] = clp_time(model)
            print(f"      CLP data-free, median of 5: {entry['clp_seconds_data_free']:.3f} s", flush=True)
        if attack == "blend" and args.foreign:
            entry["foreign_torchscript"] = foreign(prep, model, repairers, params, args.seed)
        out["attacks"][attack] = entry
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
