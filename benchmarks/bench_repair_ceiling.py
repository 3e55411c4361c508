"""How far could ANP and i-BAU go on a victim? Their ceilings, measured with the ground truth (issue 25).

    BACKDOORLAB_DATA=../shared/data python benchmarks/bench_repair_ceiling.py [--attack badnets] [--seed 0]
        [--store DIR] [--anp-iterations 2000] [--anp-eps 0.4] [--json OUT]

The victim is ``bench_repairers.py``'s (the attack by name with its MNIST defaults, 10% poisoned, the
small ``cnn``; 3,000 clean held-out images for the repairers), cached in the same store.

- **ANP's ceiling**: ANP's masks after its optimisation (the paper's rule, no accuracy guard), then the
  model with the k smallest-mask neurons pruned for a sweep of k: the best ASR that *any* threshold or
  fraction on these masks could give within 3 points of CA (the bar's allowance), and where the
  trigger's neurons rank. The trigger's neurons (ground truth, for this diagnosis only): inputs of the
  first linear layer whose mean over triggered images exceeds their largest value on any clean
  held-out image.
- **i-BAU's ceiling**: the inner maximisation's value (clean held-out loss and the share of
  non-target images sent to the target) at i-BAU's universal perturbation, after its 5 ascent steps and
  after 100, against the true trigger as an additive perturbation (inside i-BAU's L2 ball when its
  norm is); then i-BAU's outer unlearning with the inner solution replaced by the true trigger (an
  oracle inner solver): what i-BAU would reach if its search found the trigger.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import header
from bench_repairers import victim

from backdoorlab.data.loader import TensorLoader
from backdoorlab.defenses import DEFENSES
from backdoorlab.defenses._surgery import Surgery
from backdoorlab.defenses.anp import neuron_layers, prune_smallest
from backdoorlab.defenses.i_bau import IBAU
from backdoorlab.evaluation import make_evaluator
from backdoorlab.store import Store


def first_linear_inputs(model, x: torch.Tensor, name: str, batch: int = 1024) -> torch.Tensor:
    """The inputs of module ``name`` (a linear layer) for every image of ``x``, (N, features)."""
    mod = dict(model.named_modules())[name]
    out: list[torch.Tensor] = []
    h = mod.register_forward_hook(lambda m, inp, o: out.append(inp[0].detach().flatten(1)))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(x[i:i + batch])
    finally:
        h.remove()
    return torch.cat(out)


def anp_ceiling(model, hold, triggered, ev, base_ca: float, iterations: int, seed: int, eps: float = 0.4) -> dict:
    res = DEFENSES.create("anp", iterations=iterations, eps=eps, tolerance=None, seed=seed).repair(model, hold)
    flat = torch.tensor(res.details["mask_values"])
    net = copy.deepcopy(model).eval()
    s = Surgery(net, hold.float_batch(slice(0, 8)))
    layers = neuron_layers(s)
    base = {ly.scale: s.tensor(ly.scale).detach().clone() for ly in layers}
    assert sum(ly.n for ly in layers) == flat.numel()
    order = torch.argsort(flat, stable=True)
    n = flat.numel()
    # the trigger's neurons: inputs of the first linear layer, dormant on clean images, awake on triggered ones
    start, trig_idx = 0, torch.empty(0, dtype=torch.long)
    for ly in layers:
        if ly.dim == 1:
            mod = ly.scale.rsplit(".", 1)[0]
            a_clean = first_linear_inputs(model, hold.x, mod)
            a_trig = first_linear_inputs(model, triggered.x[:1000], mod)
            beyond = a_trig.mean(0) > a_clean.amax(0)  # driven by the trigger beyond any clean image's value
            trig_idx = start + torch.nonzero(beyond).flatten()
            ratio = (a_trig.mean(0)[beyond] / a_clean.mean(0)[beyond].clamp_min(1e-6)).median() if beyond.any() else 0
            print(f"   {ly.name}: {ly.n} neurons, {int((a_clean.abs().amax(0) == 0).sum())} zero on every clean held-out "
                  f"image; {len(trig_idx)} whose mean on triggered images exceeds their largest clean value (the "
                  f"trigger's; median {float(ratio):.0f}x their clean mean)", flush=True)
        start += ly.n
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)
    tm = flat[trig_idx]
    trig = {"count": len(trig_idx), "mask_min": float(tm.min()) if len(tm) else None,
            "mask_median": float(tm.median()) if len(tm) else None,
            "rank_min": int(rank[trig_idx].min()) if len(tm) else None,
            "share_of_masks_below_1": float((flat < 1).float().mean())}
    print(f"   ANP masks ({iterations} iterations, eps {eps}): {n} neurons, {int((flat < 0.2).sum())} below 0.2, "
          f"{int((flat < 1).sum())} below 1; the trigger's {trig['count']}: mask min {trig['mask_min']}, "
          f"median {trig['mask_median']}, first rank {trig['rank_min']} of {n}", flush=True)
    ks = sorted({int(round(f * n)) for f in (0, .001, .002, .005, .01, .02, .03, .05, .075, .1, .15, .2, .3, .4, .5)})
    curve = []
    for k in ks:
        prune_smallest(s, layers, base, order, k)
        m = ev(net)
        curve.append({"pruned": k, "fraction": round(k / n, 4), **{a: round(b, 4) for a, b in m.items()}})
        print(f"      prune {k:5d} ({k / n:.3f}) smallest masks: CA {m['clean_accuracy']:.4f}  ASR {m['attack_success_rate']:.4f}", flush=True)
    ok = [r for r in curve if r["clean_accuracy"] >= base_ca - 0.03]
    best = min(ok, key=lambda r: r["attack_success_rate"])
    print(f"   ANP ceiling: best ASR within 3 points of CA {best['attack_success_rate']:.4f} "
          f"(pruning {best['pruned']}, CA {best['clean_accuracy']:.4f})", flush=True)
    return {"iterations": iterations, "eps": eps, "trigger_neurons": trig, "curve": curve, "best_within_3_points": best}


def ibau_ceiling(model, prep, hold, ev, seed: int) -> dict:
    ib = IBAU(seed=seed)
    radius = ib.eps * math.sqrt(math.prod(hold.shape))
    trig = prep.attack.apply_trigger(torch.zeros(1, *hold.shape))  # the trigger as an additive perturbation
    target = int(prep.triggered_test.y[0])
    keep = hold.y != target

    def value(delta: torch.Tensor) -> dict:
        with torch.no_grad():
            logits = model((hold.x + delta).clamp(0, 1))
            return {"norm": round(float(delta.norm()), 3), "loss": round(float(F.cross_entropy(logits, hold.y)), 4),
                    "to_target": round(float((logits[keep].argmax(1) == target).float().mean()), 4)}

    g = torch.Generator().manual_seed(seed)
    loader = TensorLoader(hold.x, hold.y, ib.tune_batch_size, shuffle=True, generator=g)
    start = torch.rand(1, *hold.shape, generator=g)
    start = start * (0.5 * radius / start.norm())  # i-BAU's random start
    rows = {"zero": value(torch.zeros(1, *hold.shape)), "random_start": value(start)}
    for steps in (5, 100):
        rows[f"ascent_{steps}_steps"] = value(IBAU(seed=seed, inner_steps=steps)._inner(model, loader, start, radius))
    rows["true_trigger"] = value(trig)
    print(f"   i-BAU's inner maximisation (ball radius {radius:.2f}; clean held-out loss / share of non-target "
          f"images sent to {target}):", flush=True)
    for k, v in rows.items():
        print(f"      {k:20s} norm {v['norm']:6.3f}  loss {v['loss']:8.4f}  to target {v['to_target']:.4f}", flush=True)

    class OracleIBAU(IBAU):
        def _inner(self, net, loader, delta, radius):  # noqa: ARG002 - the oracle ignores its search
            return trig.clone()

    res = OracleIBAU(seed=seed).repair(model, hold)
    oracle = {a: round(b, 4) for a, b in ev(res.model).items()}
    default = {a: round(b, 4) for a, b in ev(IBAU(seed=seed).repair(model, hold).model).items()}
    print(f"   i-BAU (defaults): CA {default['clean_accuracy']:.4f}  ASR {default['attack_success_rate']:.4f}; "
          f"with the true trigger as its inner solution: CA {oracle['clean_accuracy']:.4f}  "
          f"ASR {oracle['attack_success_rate']:.4f}", flush=True)
    return {"radius": radius, "inner": rows, "default": default, "oracle_inner": oracle}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--attack", default="badnets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anp-iterations", type=int, default=2000)
    ap.add_argument("--anp-eps", type=float, default=0.4, help="ANP's perturbation budget (the paper's 0.4)")
    ap.add_argument("--only", choices=["anp", "i-bau"], default=None)
    ap.add_argument("--store", type=Path, default=Path("backdoorlab-runs/bench-repairers"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    header(f"ANP's and i-BAU's ceilings on {args.data} {args.attack}, seed {args.seed}")
    _cfg, prep, model, base = victim(args.data, args.attack, args.seed, Store(args.store))
    hold = prep.splits.holdout
    ev = make_evaluator(prep.splits.test, prep.triggered_test)
    print(f"   victim CA {base['clean_accuracy']:.4f}  ASR {base['attack_success_rate']:.4f}, {len(hold)} clean held-out images", flush=True)
    out: dict = {"data": args.data, "attack": args.attack, "seed": args.seed, "victim": base}
    if args.only in (None, "anp"):
        out["anp"] = anp_ceiling(model, hold, prep.triggered_test, ev, base["clean_accuracy"], args.anp_iterations, args.seed,
                                 args.anp_eps)
    if args.only in (None, "i-bau"):
        out["i-bau"] = ibau_ceiling(model, prep, hold, ev, args.seed)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
