"""Sample level (issue 22): pattern subtraction on the backdoored models the pairwise audit finds
(its own rule: verdict true and the true target or pair named), from a population report's cells.csv.

    python benchmarks/bench_population_cleansing.py REPORT/cells.csv [--min-asr 0.5]
"""
import csv
import statistics
import sys



def key(r):
    return (r["data"], r["model"], r["attack"], r["seed"])


def f(v):
    return float(v) if v not in ("", None) else float("nan")


rows = list(csv.DictReader(open(sys.argv[1])))
min_asr = float(sys.argv[sys.argv.index("--min-asr") + 1]) if "--min-asr" in sys.argv else 0.0
pw = {key(r): r for r in rows if r["defense"] == "pairwise" and r["status"] == "done"}
ps = {key(r): r for r in rows if r["defense"] == "pattern-subtraction" and r["status"] == "done"}
found, clean_fpr = [], []
for k, p in sorted(ps.items()):
    if k[2] == "none":
        clean_fpr.append(f(p["flagged"]) if p.get("flagged") else 0.0)
        continue
    w = pw.get(k)
    if w is None:
        continue
    hit = f(w["backdoored"]) == 1.0 and (f(w["pair_found"]) == 1.0 or f(w["target_found"]) == 1.0)
    asr = f(w["attack_success_rate_before"])
    print(f"{'/'.join(k):42s} asr {asr:.3f} found {int(hit)}  TPR {f(p['tpr']):.3f} FPR {f(p['fpr']):.4f}")
    if hit and asr >= min_asr:
        found.append((f(p["tpr"]), f(p["fpr"]), k))
tp = [t for t, _, _ in found]; fp = [x for _, x, _ in found]
print(f"\nfound by the audit (ASR >= {min_asr}): {len(found)}; median TPR {statistics.median(tp):.3f}, median FPR {statistics.median(fp):.4f}; "
      f"TPR>=0.95 & FPR<=0.01 on {sum(t >= 0.95 and x <= 0.01 for t, x, _ in found)} of {len(found)}")
print(f"clean models: samples flagged per model (median, max): {statistics.median(clean_fpr):.0f}, {max(clean_fpr):.0f}")
