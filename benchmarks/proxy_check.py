"""Which proxy can a user trust? On random subsets of a large stored run, how often does each measure
order the run's curves the way the full run's task metric orders them, and how often does its critical
sparsity interval cover the full run's value (the paper's critical sparsity on every document)?

    python benchmarks/proxy_check.py RUN_DIR [--sizes 30,60,120,240] [--draws 50] [--resamples 300]
                                    [--values 0.95,0.9,0.8] [--json OUT.json]

Measures: the task metric (the paper's critical sparsity), the crossing of agreement ≥ 0.99 and of mean
KL ≤ 0.05, the gold probability ratio ≥ 0.99 (the measure an earlier headline used), and the damage
proxies at matched sparsity (mean KL, agreement at 40 %). For each pair of curves the full run's order is
the order of their critical sparsity on every document; a subset's measure agrees when it orders the pair
the same way, and 'resolved' counts the draws whose paired interval excludes 0 (right or wrong way).
Coverage: the share of draws whose 95 % interval holds the full run's critical sparsity.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from actsparse.analysis import (
    PAPER,
    Criterion,
    Curve,
    analyse_curve,
    curves,
    draw_weights,
    generator,
    grouped_results,
    matched_difference,
    percentile_interval,
    ratio,
)
from actsparse.study.store import RunStore

CROSSINGS = {
    "task metric (critical sparsity)": PAPER,
    "agreement ≥ 0.99": Criterion.of("agreement"),
    "mean KL ≤ 0.05": Criterion.of("kl"),
    "gold probability ≥ 99 % (old headline)": PAPER,  # the task curve with p_gold put in its place
}
MATCHED = {"mean KL at 40 %": "mean KL ≤ 0.05", "agreement at 40 %": "agreement ≥ 0.99"}


def gold_curve(curve: Curve, grouped, ids: dict[str, list[int]]) -> Curve:
    """The same curve on the gold answer's probability (each document's metrics['p_gold'])."""
    dense, sparse = grouped

    def values(result) -> np.ndarray:
        by_id = {d.doc_id: d.metrics.get("p_gold", np.nan) for d in result.docs}
        return np.array([by_id[i] for i in ids_t], dtype=float)

    new_dense, new_scores = {}, {}
    for t in curve.dense:
        ids_t = ids[t]
        new_dense[t] = values(dense[t])
        new_scores[t] = np.stack([values(sparse[(curve.target, curve.rule, v)][t]) for v in curve.params])
    return replace(curve, dense=new_dense, scores=new_scores)


def subset(curve: Curve, index: dict[str, np.ndarray]) -> Curve:
    """The curve on a subset of its documents (per task, positions into its arrays)."""
    counts = curve.doc_counts and {t: (z[:, index[t]], s[:, index[t]]) for t, (z, s) in curve.doc_counts.items()}
    sparsity = curve.sparsity
    if counts:
        sparsity = ratio(sum(z.sum(axis=1) for z, _ in counts.values()), sum(s.sum(axis=1) for _, s in counts.values()))
    return replace(
        curve,
        sparsity=sparsity,
        dense={t: d[index[t]] for t, d in curve.dense.items()},
        scores={t: s[:, index[t]] for t, s in curve.scores.items()},
        doc_counts=counts,
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sizes", default="30,60,120,240")
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--resamples", type=int, default=300)
    parser.add_argument("--values", default=None, help="only these rule values (default: every stored one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    with RunStore.open(args.run_dir, create=False) as store:
        grouped = grouped_results(store)
        tasks = [t for t in (store.get_meta("settings") or {}).get("tasks", sorted(grouped[0])) if t in grouped[0]]
    if args.values:
        keep = {float(v) for v in args.values.split(",")}
        grouped = (grouped[0], {k: v for k, v in grouped[1].items() if k[2] in keep})
    full: dict[str, dict] = {}
    for name, criterion in CROSSINGS.items():
        built = curves(grouped, tasks, criterion)
        if name.startswith("gold"):
            built = {k: (gold_curve(c, grouped, ids), ids) for k, (c, ids) in built.items()}
        full[name] = built
    keys = sorted(full["task metric (critical sparsity)"])
    sizes = {t: len(next(iter(full["task metric (critical sparsity)"].values()))[1][t]) for t in tasks}
    truth = {
        k: analyse_curve(c, resamples=10).critical.value
        for k, (c, _) in full["task metric (critical sparsity)"].items()
    }
    pairs = [(a, b) for a, b in itertools.combinations(keys, 2) if abs(truth[a] - truth[b]) > 1e-9]
    documents = ", ".join(f"{t} {n}" for t, n in sizes.items())
    critical = ", ".join(f"{'/'.join(k)} {100 * truth[k]:.1f} %" for k in keys)
    print(f"{args.run_dir}: {documents} documents; critical sparsity on every document: {critical}")
    rng = generator(args.seed)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        if any(n > size for size in sizes.values()):
            continue
        stats = {name: {"agree": 0, "right": 0, "wrong": 0, "pairs": 0, "covered": 0, "curves": 0}
                 for name in [*CROSSINGS, *MATCHED]}  # fmt: skip
        for _ in range(args.draws):
            index = {t: np.sort(rng.choice(sizes[t], n, replace=False)) for t in tasks}
            weights = draw_weights(dict.fromkeys(tasks, n), args.resamples, rng)
            analysed = {}
            for name, built in full.items():
                analysed[name] = {k: analyse_curve(subset(c, index), weights=weights) for k, (c, _) in built.items()}
                for k in keys:
                    lo, hi = analysed[name][k].ci
                    stats[name]["covered"] += bool(lo <= truth[k] <= hi)
                    stats[name]["curves"] += 1
                for a, b in pairs:
                    want = np.sign(truth[a] - truth[b])
                    diff = analysed[name][a].samples - analysed[name][b].samples
                    got = np.sign(analysed[name][a].critical.value - analysed[name][b].critical.value)
                    lo, hi = percentile_interval(diff)
                    s = stats[name]
                    s["pairs"] += 1
                    s["agree"] += bool(got == want)
                    s["right"] += bool((lo > 0 and want > 0) or (hi < 0 and want < 0))
                    s["wrong"] += bool((lo > 0 and want < 0) or (hi < 0 and want > 0))
            for name, crossing in MATCHED.items():
                built = full[crossing]
                for a, b in pairs:
                    want = np.sign(truth[a] - truth[b])  # more critical sparsity: less damage at 40 %
                    (row,) = matched_difference(
                        subset(built[a][0], index), subset(built[b][0], index), weights, at=(0.4,)
                    ) or [None]
                    s = stats[name]
                    if row is None:
                        continue
                    better = -1 if built[a][0].criterion.measure == "kl" else 1  # KL: lower is less damage
                    got = np.sign(better * row["value"])
                    s["pairs"] += 1
                    s["agree"] += bool(got == want)
                    lo, hi = better * row["ci_low"], better * row["ci_high"]
                    lo, hi = min(lo, hi), max(lo, hi)
                    s["right"] += bool((lo > 0 and want > 0) or (hi < 0 and want < 0))
                    s["wrong"] += bool((lo > 0 and want < 0) or (hi < 0 and want > 0))
        for name, s in stats.items():
            rows.append(
                {
                    "documents per task": n,
                    "measure": name,
                    "orders as the full run": s["agree"] / s["pairs"] if s["pairs"] else None,
                    "resolved, right way": s["right"] / s["pairs"] if s["pairs"] else None,
                    "resolved, wrong way": s["wrong"] / s["pairs"] if s["pairs"] else None,
                    "interval covers the full run's critical sparsity": s["covered"] / s["curves"]
                    if s["curves"]
                    else None,
                }
            )
    head = list(rows[0]) if rows else []
    print(f"\n{args.draws} draws per size, {args.resamples} resamples, pairs of curves: {len(pairs)}\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [
            str(v) if isinstance(v, (int, str)) else ("–" if v is None else f"{100 * v:.0f} %") for v in r.values()
        ]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run_dir), "truth": {"/".join(k): v for k, v in truth.items()},
                                         "rows": rows}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
