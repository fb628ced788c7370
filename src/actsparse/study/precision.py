"""Precision as a sweep axis (`actsparse sweep --dtypes float32,bfloat16`): does critical sparsity depend
on the number format?

Each dtype runs as its own sweep in OUT/DTYPE (a folder binds one dtype, so it never mixes precisions),
every one on the same documents (the seeded sample depends only on task, limit and seed).
OUT/precision.json names the dtypes; OUT/summary.json puts each dtype's critical sparsity beside the
others, with its interval, and the paired difference between dtypes with its own paired-bootstrap
interval: each resample draws the same documents for both dtypes and for their dense baselines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import replace
from itertools import combinations
from pathlib import Path
from typing import Any

from actsparse.analysis.curves import PAPER, THRESHOLD, Criterion, Curve, analyse_curve, build_curve, paired_values
from actsparse.analysis.curves import paired_difference as curve_difference
from actsparse.analysis.damage import MATCHED_SPARSITIES, PROXIES, matched_difference, verdict
from actsparse.analysis.statistics import LEVEL, RESAMPLES, draw_weights, paired_mean_difference
from actsparse.analysis.summary import grouped_results, to_json
from actsparse.evaluate.results import TaskResult
from actsparse.study.store import RunStore, StoreError, atomic_path

MANIFEST = "precision.json"


def is_precision_folder(run_dir: str | Path) -> bool:
    """Whether `run_dir` is the folder of a `--dtypes` sweep (one sub-folder per dtype)."""
    return (Path(run_dir) / MANIFEST).exists()


def dtypes_of(run_dir: str | Path) -> list[str]:
    """The dtypes a `--dtypes` folder holds, in the order they were first asked for."""
    return list(json.loads((Path(run_dir) / MANIFEST).read_text())["dtypes"])


def _write_json(path: Path, data: Any) -> None:
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False))
    os.replace(tmp, path)


def prepare_dtypes(config: Any, dtypes: Sequence[str]) -> list[Any]:
    """One sweep config per dtype (OUT/DTYPE), each validated and its folder bound, before any model work."""
    from actsparse.study.sweep import prepare

    if not dtypes:
        raise ValueError("--dtypes names no dtype")
    out = Path(config.out)
    if (out / RunStore.FILENAME).exists():
        raise StoreError(f"{out} holds a single-dtype run ({RunStore.FILENAME}): use another --out folder for --dtypes")
    configs = [replace(config, dtype=dtype, out=out / dtype) for dtype in dtypes]
    for c in configs:
        store, _ = prepare(c)  # validates and binds (dtype, device, limit, ...): exit 2 on a mismatch
        store.close()
    known = dtypes_of(out) if is_precision_folder(out) else []
    _write_json(out / MANIFEST, {"dtypes": known + [d for d in dtypes if d not in known]})
    return configs


def run_dtypes_sweep(
    config: Any, dtypes: Sequence[str], model: Any = None, tokenizer: Any = None, show_progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) the sweep once per dtype into OUT/DTYPE; return the comparison, also in OUT/summary.json."""
    from actsparse.study.sweep import run_sweep

    for c in prepare_dtypes(config, dtypes):
        run_sweep(c, model, tokenizer, show_progress=show_progress)
    return write_comparison(config.out, resamples=config.resamples, seed=config.seed)


# --- analysis ---------------------------------------------------------------------------------------


def paired_curves(
    runs: dict[str, tuple[dict[str, TaskResult], dict[tuple[str, str, float], dict[str, TaskResult]]]],
    tasks: list[str],
    criterion: Criterion = PAPER,
) -> dict[tuple[str, str], dict[str, Curve]]:
    """(target, rule) → dtype → its curve over complete points, every curve on the same documents per task
    (those all of its dtypes' runs scored), so that one resample of documents serves them all."""
    labels: dict[tuple[str, str], dict[str, list[float]]] = {}
    for dtype, (dense, sparse) in runs.items():
        for (target, rule, value), by_task in sparse.items():
            if all(t in by_task for t in tasks) and all(t in dense for t in tasks):
                labels.setdefault((target, rule), {}).setdefault(dtype, []).append(value)
    out: dict[tuple[str, str], dict[str, Curve]] = {}
    for (target, rule), values in labels.items():
        if len(values) < 2:
            continue
        ids: dict[str, list[int]] = {}
        for t in tasks:
            shared: set[int] | None = None
            for dtype, vals in values.items():
                dense, sparse = runs[dtype]
                for r in [dense[t], *(sparse[(target, rule, v)][t] for v in vals)]:
                    docs = {d.doc_id for d in r.docs}
                    shared = docs if shared is None else shared & docs
            ids[t] = sorted(shared or ())
        curves = {}
        for dtype, vals in values.items():
            dense, sparse = runs[dtype]
            vals = sorted(vals, reverse=True)
            curves[dtype] = build_curve(
                target,
                rule,
                vals,
                {t: dense[t] for t in tasks},
                {t: [sparse[(target, rule, v)][t] for v in vals] for t in tasks},
                criterion,
                ids,
            )[0]
        out[(target, rule)] = curves
    return out


def paired_difference(
    a: Curve,
    b: Curve,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    weights: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Critical sparsity of `b` minus that of `a`, with a paired-bootstrap interval: each resample draws
    documents per task once and uses that draw for both curves and both dense baselines (`weights`: that
    draw, when the caller reuses it; else drawn here from `seed`)."""
    for t in a.scores:
        if len(b.dense.get(t, ())) != len(a.dense[t]):
            raise ValueError(f"task {t}: the two curves do not score the same documents")
    if weights is None:
        weights = draw_weights({t: len(a.dense[t]) for t in a.scores}, resamples, seed)
    first, second = analyse_curve(a, weights=weights, level=level), analyse_curve(b, weights=weights, level=level)
    diff = curve_difference(second, first, level)
    return diff | {
        "a": first.critical.value,
        "b": second.critical.value,
        "documents": {t: len(a.dense[t]) for t in weights},
    }


def _dense_difference(da: TaskResult, db: TaskResult, resamples: int, seed: int, level: float) -> dict[str, Any]:
    """Dense score of `db` minus `da` on their shared documents, with a paired-bootstrap interval."""
    dense_a, scores_b, ids, _ = paired_values(da, [db])
    value, (lo, hi) = paired_mean_difference(scores_b[0], dense_a, resamples, seed, level)
    answers = {d.doc_id: d.answer for d in da.docs}
    agree = sum(d.answer == answers[d.doc_id] for d in db.docs if d.doc_id in answers)
    return {
        "value": value if ids else None,
        "ci_low": lo,
        "ci_high": hi,
        "agreement": agree / len(ids) if ids else None,
        "documents": len(ids),
    }


def compare(
    run_dir: str | Path,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    matched: tuple[float, ...] = MATCHED_SPARSITIES,
) -> dict[str, Any]:
    """The comparison of a `--dtypes` folder: per dtype its summary's critical sparsity and dense scores,
    and for every pair of dtypes (later minus earlier) the paired difference with its interval."""
    from actsparse.analysis import write_summary

    run_dir = Path(run_dir)
    dtypes = [d for d in dtypes_of(run_dir) if (run_dir / d / RunStore.FILENAME).exists()]
    summaries: dict[str, dict[str, Any]] = {}
    runs = {}
    for dtype in dtypes:
        summaries[dtype] = write_summary(run_dir / dtype, resamples=resamples, seed=seed, level=level)
        with RunStore.open(run_dir / dtype, create=False) as store:
            runs[dtype] = grouped_results(store)
    tasks: list[str] = next((s["tasks"] for s in summaries.values() if s["tasks"]), [])
    for s in summaries.values():
        if s["tasks"] and s["tasks"] != tasks:
            tasks = [t for t in tasks if t in s["tasks"]]
    critical: dict[str, dict[str, Any]] = {}
    for dtype, s in summaries.items():
        for label, record in s["critical_sparsity"].items():
            critical.setdefault(label, {})[dtype] = record
    differences: dict[str, dict[str, Any]] = {}
    proxies = {m: paired_curves(runs, tasks, Criterion.of(m)) for m in PROXIES}
    for (target, rule), curves in paired_curves(runs, tasks).items():
        for a, b in combinations([d for d in dtypes if d in curves], 2):
            weights = draw_weights({t: len(curves[a].dense[t]) for t in tasks}, resamples, seed)
            diff = paired_difference(curves[a], curves[b], resamples, seed, level, weights)
            damage = {
                m: matched_difference(
                    proxies[m][(target, rule)][b], proxies[m][(target, rule)][a], weights, matched, level, (b, a)
                )
                for m in PROXIES
            }
            differences.setdefault(f"{target}/{rule}", {})[f"{b} - {a}"] = diff | {
                "damage": damage,
                "verdict": verdict(b, a, diff, damage),
            }
    dense_diff: dict[str, dict[str, Any]] = {}
    for t in tasks:
        for a, b in combinations(dtypes, 2):
            if t in runs[a][0] and t in runs[b][0]:
                dense_diff.setdefault(t, {})[f"{b} - {a}"] = _dense_difference(
                    runs[a][0][t], runs[b][0][t], resamples, seed, level
                )
    first = summaries[dtypes[0]] if dtypes else {}
    return to_json(
        {
            "kind": "precision",
            "model": first.get("model"),
            "dtypes": dtypes,
            "tasks": tasks,
            "splits": first.get("splits", {}),
            "n_docs": {d: s["n_docs"] for d, s in summaries.items()},
            "dense": {d: s["dense"] for d, s in summaries.items()},
            "critical_sparsity": critical,
            "differences": differences,
            "dense_differences": dense_diff,
            "points": {d: s["points"] for d, s in summaries.items()},
            "settings": first.get("settings", {}),
            "provenance": {d: s.get("provenance") for d, s in summaries.items()},
            "threshold": THRESHOLD,
            "bootstrap": {"resamples": resamples, "seed": seed, "level": level, "paired": True},
        }
    )


def write_comparison(run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """`compare` a `--dtypes` folder into OUT/summary.json (written atomically); return it."""
    summary = compare(run_dir, **kwargs)
    _write_json(Path(run_dir) / "summary.json", summary)
    return summary


__all__ = [
    "MANIFEST",
    "compare",
    "dtypes_of",
    "is_precision_folder",
    "paired_curves",
    "paired_difference",
    "prepare_dtypes",
    "run_dtypes_sweep",
    "write_comparison",
]
