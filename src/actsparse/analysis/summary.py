"""`summary.json`: a run's points, curves and critical sparsity, gathered from its `RunStore`.

The headline is the paper's critical sparsity (each task's own metric, sparse / dense, mean over tasks,
≥ 99 %). Beside it: per task, power, the proxies per point (mean KL, answer agreement), and the
comparisons of curves that critical sparsity may not separate, by damage at matched sparsity.
"""

from __future__ import annotations

import json
import math
import os
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from actsparse.analysis.curves import (
    PAPER,
    THRESHOLD,
    Criterion,
    Curve,
    CurveAnalysis,
    achieved_sparsity,
    analyse_curve,
    build_curve,
    critical_record,
    paired_difference,
    paired_values,
    task_measure_key,
)
from actsparse.analysis.damage import MATCHED_SPARSITIES, PROXIES, matched_difference, verdict
from actsparse.analysis.power import POWER_TARGET, predicted_documents
from actsparse.analysis.statistics import (
    LEVEL,
    RESAMPLES,
    draw_weights,
    generator,
    mean_over_tasks,
    percentile_interval,
    ratio,
    resample_weights,
)
from actsparse.evaluate.results import SPARSITY_SEEN, SPARSITY_ZEROED, DocResult, TaskResult
from actsparse.study.store import RunStore, atomic_path

Grouped = tuple[dict[str, TaskResult], dict[tuple[str, str, float], dict[str, TaskResult]]]


def mean_kl(docs: list[DocResult]) -> float | None:
    """Token-weighted mean of the documents' KL(dense ‖ sparse); None when no document has one."""
    pairs = [(d.kl, max(d.tokens, 1)) for d in docs if d.kl is not None and math.isfinite(d.kl)]
    if not pairs:
        return None
    return sum(k * n for k, n in pairs) / sum(n for _, n in pairs)


def agreement(dense: list[DocResult], sparse: list[DocResult]) -> float | None:
    """Fraction of the shared documents whose chosen answer is the dense one (None if none shared)."""
    answers = {d.doc_id: d.answer for d in dense}
    shared = [d for d in sparse if d.doc_id in answers]
    if not shared:
        return None
    return sum(d.answer == answers[d.doc_id] for d in shared) / len(shared)


def grouped_results(store: RunStore) -> Grouped:
    """A store's results: dense by task, and sparse by (target, rule, value), then task."""
    dense: dict[str, TaskResult] = {}
    sparse: dict[tuple[str, str, float], dict[str, TaskResult]] = {}
    for key, result in store.items():
        if key.is_dense:
            dense[key.task] = result
        else:
            sparse.setdefault((key.target, key.rule, key.value), {})[key.task] = result
    return dense, sparse


def task_ratio(dense: TaskResult, sparse: TaskResult) -> float:
    """The paper's sparse / dense on one task, on the documents both have (bpb tasks: dense / sparse bpb)."""
    d, s, _, _ = paired_values(dense, [sparse])
    if task_measure_key(dense) is not None:
        return float(ratio(d.sum(), s.sum()))
    return float(ratio(s.sum(), d.sum()))


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _pooled(results: list[TaskResult]) -> float | None:
    """A point's achieved sparsity over its tasks' documents (Σ zeroed / Σ seen), as its curve has it."""
    docs = [d for r in results for d in r.docs]
    if docs and all(SPARSITY_SEEN in d.metrics for d in docs):
        seen = sum(d.metrics[SPARSITY_SEEN] for d in docs)
        return sum(d.metrics[SPARSITY_ZEROED] for d in docs) / seen if seen else None
    return _mean([achieved_sparsity(r) for r in results])


def point_measure(dense: dict[str, TaskResult], results: dict[str, TaskResult]) -> tuple[float, float]:
    """(achieved sparsity pooled over the tasks' documents, normalised performance on the paper's measure)
    of one (target, rule, value) whose results per task are `results`: what bisection steers by."""
    tasks = [t for t in results if t in dense]
    sparsity = _pooled([results[t] for t in tasks])
    performance = _mean([task_ratio(dense[t], results[t]) for t in tasks])
    return (math.nan if sparsity is None else sparsity), (math.nan if performance is None else performance)


def _point(dense: dict[str, TaskResult], key: tuple[str, str, float], by_task: dict[str, TaskResult], tasks: list[str]):
    target, rule, value = key
    layers: dict[str, list[float]] = {}
    for r in by_task.values():
        for layer, s in r.sparsity.get("all", {}).get("per_layer", {}).items():
            layers.setdefault(layer, []).append(float(s))
    done = [t for t in tasks if t in by_task]
    normalized = {t: task_ratio(dense[t], by_task[t]) for t in done}
    kl = {t: mean_kl(by_task[t].docs) for t in done}
    agree = {t: agreement(dense[t].docs, by_task[t].docs) for t in done}
    return {
        "target": target,
        "rule": rule,
        "value": value,
        "sparsity": _pooled([by_task[t] for t in done]),
        "sparsity_per_layer": {k: sum(v) / len(v) for k, v in sorted(layers.items(), key=lambda kv: int(kv[0]))},
        "scores": {t: by_task[t].score for t in done},
        "normalized": _mean(list(normalized.values())),
        "normalized_per_task": normalized,
        "kl": _mean(list(kl.values())),
        "agreement": _mean(list(agree.values())),
        "sparsity_per_task": {t: achieved_sparsity(by_task[t]) for t in done},
        "kl_per_task": kl,
        "agreement_per_task": agree,
        "complete": set(done) == set(tasks),
    }


def curves(
    grouped: Grouped, tasks: list[str], criterion: Criterion = PAPER
) -> dict[tuple[str, str], tuple[Curve, dict[str, list[int]]]]:
    """One curve per (target, rule) of a store's complete points (every task run), on a criterion's measure."""
    dense, sparse = grouped
    by_curve: dict[tuple[str, str], list[float]] = {}
    for (target, rule, value), by_task in sparse.items():
        if tasks and all(t in by_task for t in tasks):
            by_curve.setdefault((target, rule), []).append(value)
    return {
        (target, rule): build_curve(
            target,
            rule,
            sorted(values, reverse=True),
            {t: dense[t] for t in tasks},
            {t: [sparse[(target, rule, v)][t] for v in sorted(values, reverse=True)] for t in tasks},
            criterion,
        )
        for (target, rule), values in sorted(by_curve.items())
    }


def _pairs(keys: list[tuple[str, str]]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """The comparisons a sweep offers: targets under one rule (the later SPEC target first), and rules on
    one target (top_p second, as the reference)."""
    from actsparse.sparsity.spec import TARGETS

    order = {t: i for i, t in enumerate(TARGETS)}
    out = []
    for a, b in combinations(keys, 2):
        if a[1] == b[1]:
            out.append((a, b) if order.get(a[0], 99) > order.get(b[0], 99) else (b, a))
        elif a[0] == b[0]:
            out.append((b, a) if a[1] == "top_p" else (a, b))
    return out


def summarize(
    store: RunStore,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    power: bool = True,
    criterion: Criterion = PAPER,
    matched: tuple[float, ...] = MATCHED_SPARSITIES,
) -> dict[str, Any]:
    """Everything the report needs, as a JSON-ready dict (the content of summary.json).
    `power`: also predict the documents each curve needs for a ±2-point interval (the slow part);
    `criterion`: a crossing besides the paper's critical sparsity, named after its measure."""
    grouped = grouped_results(store)
    dense, sparse = grouped
    settings = store.get_meta("settings") or {}
    tasks = [t for t in settings.get("tasks", sorted(dense)) if t in dense]
    points = [_point(dense, key, by_task, tasks) for key, by_task in sparse.items()]
    points.sort(key=lambda p: (p["target"], p["rule"], -p["value"]))

    dense_ids = {t: sorted(d.doc_id for d in dense[t].docs) for t in tasks}
    weights = draw_weights({t: len(dense_ids[t]) for t in tasks}, resamples, seed)

    def mine(ids: dict[str, list[int]]) -> dict[str, np.ndarray]:  # the shared draw, on a curve's documents
        return {t: weights[t][:, np.searchsorted(dense_ids[t], ids[t])] for t in tasks}

    analyses: dict[tuple[str, str], CurveAnalysis] = {}
    critical, per_task, power_curves, reached = {}, {}, {}, True
    paper = curves(grouped, tasks, PAPER)
    for key, (curve, ids) in paper.items():
        label = "/".join(key)
        analysis = analyses[key] = analyse_curve(curve, resamples, seed, level, weights=mine(ids))
        reached &= curve.doc_counts is not None
        critical[label] = critical_record(analysis.critical, analysis.ci, curve.params) | {
            "half_width": analysis.half_width,
            "ci_fixed_sparsity": analysis.ci_fixed_sparsity,
            "documents": max(len(v) for v in ids.values()),
        }
        per_task[label] = {t: critical_record(c, ci, curve.params) for t, (c, ci) in analysis.per_task.items()}
        needed = predicted_documents(curve, POWER_TARGET, resamples, seed, level) if power else None
        power_curves[label] = {
            "half_width": analysis.half_width,
            "documents": max(len(v) for v in ids.values()),
            "documents_needed": needed,
        }

    proxies = {m: curves(grouped, tasks, Criterion.of(m)) for m in PROXIES}
    comparisons = []
    for first, second in _pairs(list(paper)):
        diff = paired_difference(analyses[first], analyses[second], level)
        damage = {
            m: matched_difference(
                proxies[m][first][0], proxies[m][second][0], mine(proxies[m][first][1]), matched, level
            )
            for m in PROXIES
            if proxies[m][first][1] == proxies[m][second][1]  # the same documents: paired
        }
        a, b = "/".join(first), "/".join(second)
        comparisons.append(
            {"first": a, "second": b, "critical": diff, "damage": damage, "verdict": verdict(a, b, diff, damage)}
        )

    out: dict[str, Any] = {
        "model": settings.get("model"),
        "tasks": tasks,
        "dense": {t: dense[t].score for t in tasks},
        "points": points,
        "critical_sparsity": critical,
        "critical_sparsity_per_task": per_task,
        "comparisons": comparisons,
        "matched_sparsities": list(matched),
        "power": {"target_half_width": POWER_TARGET, "curves": power_curves},
        "sparsity_resampled": bool(critical) and reached,
        "splits": {t: dense[t].split for t in tasks},
        "metrics": {t: dense[t].metric for t in tasks},
        "n_docs": {t: len(dense[t].docs) for t in tasks},
        "threshold": THRESHOLD,
        "bootstrap": {"resamples": resamples, "seed": seed, "level": level, "paired": True},
        "settings": settings,
        "search": store.get_meta("search") or {"method": "grid"},  # bisect: which values it evaluated
        "provenance": store.get_meta("provenance"),  # version, model source, dtype, device, command
    }
    if not criterion.is_paper:
        crossing = {}
        for key, (curve, ids) in curves(grouped, tasks, criterion).items():
            analysis = analyse_curve(curve, resamples, seed, level, weights=mine(ids))
            crossing["/".join(key)] = critical_record(analysis.critical, analysis.ci, curve.params)
        out["criterion"] = {"text": criterion.text(), "name": criterion.name(), "crossing": crossing}
    return to_json(out)


def point_bands(
    store: RunStore, tasks: list[str], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> dict[tuple[str, str, float], dict[str, tuple[float, float]]]:
    """Per-point paired-bootstrap intervals of the paper's sparse / dense: point → {task: (lo, hi),
    'average': (lo, hi)}. Each resample draws a task's documents with replacement, the same draw for its
    dense and sparse values; 'average' (points with every task) is the mean over tasks per resample."""
    dense, sparse = grouped_results(store)
    out: dict[tuple[str, str, float], dict[str, tuple[float, float]]] = {}
    for n, (point, by_task) in enumerate(sorted(sparse.items())):
        rng = generator([seed, n])
        boot: dict[str, np.ndarray] = {}
        for task in tasks:
            if task not in by_task or task not in dense:
                continue
            d, s, ids, _ = paired_values(dense[task], [by_task[task]])
            if not ids:
                continue
            w = resample_weights(len(ids), resamples, rng).astype(float)
            num, den = (w @ d, w @ s[0]) if task_measure_key(dense[task]) else (w @ s[0], w @ d)
            boot[task] = ratio(num, den)
        intervals = {t: percentile_interval(b, level) for t, b in boot.items()}
        if boot and len(boot) == len(tasks):
            intervals["average"] = percentile_interval(mean_over_tasks(list(boot.values())), level)
        out[point] = {k: v for k, v in intervals.items() if np.isfinite(v).all()}
    return out


def to_json(obj: Any) -> Any:
    """NaN and ±Inf → None, tuples → lists, numpy scalars → Python, so that the JSON is valid everywhere."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.generic):
        return to_json(obj.item())
    return obj


def write_summary(run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Summarise `run_dir/results.sqlite` into `run_dir/summary.json` (written atomically); return it."""
    run_dir = Path(run_dir)
    with RunStore.open(run_dir, create=False) as store:
        summary = summarize(store, **kwargs)
    path = run_dir / "summary.json"
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(summary, indent=2, allow_nan=False))
    os.replace(tmp, path)
    return summary


__all__ = [
    "agreement",
    "curves",
    "grouped_results",
    "mean_kl",
    "point_bands",
    "point_measure",
    "summarize",
    "task_ratio",
    "to_json",
    "write_summary",
]
