"""Analysis of a sweep (SPEC §4): normalised performance, critical sparsity with a paired-bootstrap
interval over documents, mean KL and answer agreement per point, and `summary.json`.

The math is in pure numpy functions; `summarize` gathers a `RunStore` into curves and calls them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actsparse.evaluate.results import DocResult, TaskResult
from actsparse.store import RunStore, atomic_path

THRESHOLD = 0.99
"""Normalised performance below which a point has lost more than 1 %."""

RESAMPLES = 1000
LEVEL = 0.95


def ratio(sparse: np.ndarray | float, dense: np.ndarray | float) -> np.ndarray:
    """sparse / dense elementwise; NaN where the dense score is 0 (the ratio is undefined there)."""
    s, d = np.asarray(sparse, dtype=float), np.asarray(dense, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, s / np.where(d > 0, d, 1.0), np.nan)


def normalized_performance(scores: Mapping[str, float], dense: Mapping[str, float]) -> float:
    """Mean over tasks of sparse / dense score; tasks with a dense score of 0 are left out (NaN if all are)."""
    values = [float(ratio(scores[t], dense[t])) for t in scores]
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


@dataclass(frozen=True)
class Critical:
    """Critical sparsity of one curve: interpolated value, last grid point ≥ threshold, lower-bound flag."""

    value: float  # interpolated achieved sparsity where normalised performance crosses the threshold
    grid_value: float  # achieved sparsity of the last point before the crossing (the paper's reading)
    grid_index: int  # index (into the caller's points) of that point; -1 for the dense baseline
    lower_bound: bool  # the curve never crosses: `value` is the highest sparsity tried, a lower bound


def critical_sparsity_batch(
    sparsity: np.ndarray, performance: np.ndarray, threshold: float = THRESHOLD
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Critical sparsity of many curves sharing x-values: performance is [R, m] (or [m]).

    Dense (0, 1.0) is prepended; points are taken in order of increasing sparsity (stable); the first
    point below `threshold` and the one before it are linearly interpolated. NaN performance never
    counts as a crossing. Returns (value, grid_value, grid_index, lower_bound), each of shape [R].
    """
    x = np.asarray(sparsity, dtype=float)
    perf = np.atleast_2d(np.asarray(performance, dtype=float))
    if perf.shape[-1] != x.shape[0]:
        raise ValueError(f"{x.shape[0]} sparsities but performance has {perf.shape[-1]} points")
    order = np.argsort(x, kind="stable")
    xs = np.concatenate([[0.0], x[order]])
    ps = np.concatenate([np.ones((perf.shape[0], 1)), perf[:, order]], axis=1)
    index = np.concatenate([[-1], order])
    below = ps < threshold  # NaN compares False
    crossed = below.any(axis=1)
    first = np.where(crossed, below.argmax(axis=1), len(xs) - 1)
    prev = np.where(crossed, first - 1, len(xs) - 1)
    rows = np.arange(perf.shape[0])
    p0, p1 = ps[rows, prev], ps[rows, first]
    x0, x1 = xs[prev], xs[first]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(p0 > p1, (p0 - threshold) / (p0 - p1), 0.0)
    frac = np.where(np.isfinite(frac), np.clip(frac, 0.0, 1.0), 0.0)
    value = np.where(crossed, x0 + frac * (x1 - x0), x0)
    return value, x0, index[prev], np.logical_not(crossed)


def critical_sparsity(
    sparsity: Sequence[float] | np.ndarray, performance: Sequence[float] | np.ndarray, threshold: float = THRESHOLD
) -> Critical:
    """Critical sparsity of one curve as SPEC §4 defines it (see `critical_sparsity_batch`)."""
    value, grid, index, lower = critical_sparsity_batch(np.asarray(sparsity), np.asarray(performance), threshold)
    return Critical(float(value[0]), float(grid[0]), int(index[0]), bool(lower[0]))


def resample_weights(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n] counts of each document in bootstrap resamples of n documents (with replacement)."""
    idx = rng.integers(0, n, size=(resamples, n))
    flat = (np.arange(resamples)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n)


@dataclass
class Curve:
    """One (target, rule) across its sweep values, with paired per-document scores per task."""

    target: str
    rule: str
    params: list[float]  # rule value of each point
    sparsity: np.ndarray  # [m] achieved sparsity of each point (mean over tasks)
    task_sparsity: dict[str, np.ndarray]  # task → [m] achieved sparsity on that task
    dense: dict[str, np.ndarray]  # task → [n_t] dense per-document scores
    scores: dict[str, np.ndarray]  # task → [m, n_t] sparse per-document scores, same documents

    def task_performance(self) -> dict[str, np.ndarray]:
        """task → [m] sparse / dense score."""
        return {t: ratio(self.scores[t].mean(axis=1), self.dense[t].mean()) for t in self.scores}

    def performance(self) -> np.ndarray:
        """[m] normalised performance: mean over tasks of sparse / dense."""
        return _nanmean_stack(list(self.task_performance().values()), len(self.params))


def _nanmean_stack(arrays: list[np.ndarray], m: int) -> np.ndarray:
    if not arrays:
        return np.full(m, np.nan)
    stack = np.stack(arrays)
    count = (~np.isnan(stack)).sum(axis=0)
    total = np.nansum(stack, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclass
class CurveAnalysis:
    """Critical sparsity of a curve, overall and per task, each with its bootstrap interval."""

    critical: Critical
    ci: tuple[float, float]
    per_task: dict[str, tuple[Critical, tuple[float, float]]] = field(default_factory=dict)


def analyse_curve(
    curve: Curve,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    threshold: float = THRESHOLD,
) -> CurveAnalysis:
    """Critical sparsity with a paired-bootstrap interval over documents.

    Each resample draws documents with replacement per task, the same draw for the dense run and
    every point; the whole curve and its critical sparsity are recomputed per resample (vectorised).
    """
    rng = np.random.default_rng(seed)
    tasks = sorted(curve.scores)
    boot_task: dict[str, np.ndarray] = {}
    for task in tasks:
        dense, scores = curve.dense[task], curve.scores[task]
        w = resample_weights(len(dense), resamples, rng).astype(float)  # [R, n]
        boot_task[task] = ratio(w @ scores.T, (w @ dense)[:, None])  # [R, m]
    low_q, high_q = 100 * (1 - level) / 2, 100 * (1 + level) / 2

    def interval(perf: np.ndarray, x: np.ndarray) -> tuple[float, float]:
        values = critical_sparsity_batch(x, perf, threshold)[0]
        lo, hi = np.nanpercentile(values, [low_q, high_q])
        return float(lo), float(hi)

    overall = critical_sparsity(curve.sparsity, curve.performance(), threshold)
    if tasks:
        boot = np.stack([boot_task[t] for t in tasks])  # [tasks, R, m]
        count = (~np.isnan(boot)).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            boot_perf = np.where(count > 0, np.nansum(boot, axis=0) / np.maximum(count, 1), np.nan)
        ci = interval(boot_perf, curve.sparsity)
    else:
        ci = (overall.value, overall.value)
    per_task = {}
    task_perf = curve.task_performance()
    for task in tasks:
        x = curve.task_sparsity.get(task, curve.sparsity)
        per_task[task] = (critical_sparsity(x, task_perf[task], threshold), interval(boot_task[task], x))
    return CurveAnalysis(overall, ci, per_task)


def mean_kl(docs: Sequence[DocResult]) -> float | None:
    """Token-weighted mean of the documents' KL(dense ‖ sparse); None when no document has one."""
    pairs = [(d.kl, max(d.tokens, 1)) for d in docs if d.kl is not None and math.isfinite(d.kl)]
    if not pairs:
        return None
    return sum(k * n for k, n in pairs) / sum(n for _, n in pairs)


def agreement(dense: Sequence[DocResult], sparse: Sequence[DocResult]) -> float | None:
    """Fraction of the shared documents whose chosen answer is the dense one (None if none shared)."""
    answers = {d.doc_id: d.answer for d in dense}
    shared = [d for d in sparse if d.doc_id in answers]
    if not shared:
        return None
    return sum(d.answer == answers[d.doc_id] for d in shared) / len(shared)


def _sparsity_of(result: TaskResult) -> tuple[float, dict[str, float]]:
    """(overall, per layer) sparsity of a point's run, over all phases."""
    stats = result.sparsity.get("all", {})
    return float(stats.get("sparsity", float("nan"))), {k: float(v) for k, v in stats.get("per_layer", {}).items()}


def achieved_sparsity(result: TaskResult) -> float:
    """The sparsity a point reached on one task, over all phases (NaN when its run recorded none)."""
    return _sparsity_of(result)[0]


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _paired(dense: TaskResult, results: Sequence[TaskResult]) -> tuple[np.ndarray, np.ndarray]:
    """Dense [n] and sparse [m, n] per-document scores over the documents every run has."""
    shared = {d.doc_id for d in dense.docs}
    for r in results:
        shared &= {d.doc_id for d in r.docs}
    ids = sorted(shared)

    def scores(r: TaskResult) -> np.ndarray:
        by_id = {d.doc_id: d.score for d in r.docs}
        return np.array([by_id[i] for i in ids], dtype=float)

    return scores(dense), np.stack([scores(r) for r in results]) if results else np.zeros((0, len(ids)))


def summarize(
    store: RunStore,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    threshold: float = THRESHOLD,
) -> dict[str, Any]:
    """Everything the report needs, as a JSON-ready dict (the content of summary.json)."""
    dense: dict[str, TaskResult] = {}
    sparse: dict[tuple[str, str, float], dict[str, TaskResult]] = {}
    for key, result in store.items():
        if key.is_dense:
            dense[key.task] = result
        else:
            sparse.setdefault((key.target, key.rule, key.value), {})[key.task] = result
    settings = store.get_meta("settings") or {}
    tasks = [t for t in settings.get("tasks", sorted(dense)) if t in dense]

    points: list[dict[str, Any]] = []
    for (target, rule, value), by_task in sparse.items():
        task_sparsity = {t: _sparsity_of(r)[0] for t, r in by_task.items()}
        layers: dict[str, list[float]] = {}
        for r in by_task.values():
            for layer, s in _sparsity_of(r)[1].items():
                layers.setdefault(layer, []).append(s)
        scores = {t: by_task[t].score for t in tasks if t in by_task}
        kl = {t: mean_kl(by_task[t].docs) for t in scores}
        agree = {t: agreement(dense[t].docs, by_task[t].docs) for t in scores}
        points.append(
            {
                "target": target,
                "rule": rule,
                "value": value,
                "sparsity": _mean(list(task_sparsity.values())),
                "sparsity_per_layer": {
                    k: sum(v) / len(v) for k, v in sorted(layers.items(), key=lambda kv: int(kv[0]))
                },
                "scores": scores,
                "normalized": normalized_performance(scores, {t: dense[t].score for t in scores}),
                "kl": _mean(list(kl.values())),
                "agreement": _mean(list(agree.values())),
                "sparsity_per_task": task_sparsity,
                "kl_per_task": kl,
                "agreement_per_task": agree,
                "complete": set(scores) == set(tasks),
            }
        )
    points.sort(key=lambda p: (p["target"], p["rule"], -p["value"]))

    critical: dict[str, Any] = {}
    critical_per_task: dict[str, Any] = {}
    for (target, rule), curve in _curves(points, dense, sparse, tasks).items():
        analysis = analyse_curve(curve, resamples, seed, level, threshold)
        label = f"{target}/{rule}"
        critical[label] = _critical_record(analysis.critical, analysis.ci, curve.params)
        critical_per_task[label] = {
            t: _critical_record(c, ci, curve.params) for t, (c, ci) in analysis.per_task.items()
        }

    return _finite(
        {
            "model": settings.get("model"),
            "tasks": tasks,
            "dense": {t: dense[t].score for t in tasks},
            "points": points,
            "critical_sparsity": critical,
            "critical_sparsity_per_task": critical_per_task,
            "splits": {t: dense[t].split for t in tasks},
            "metrics": {t: dense[t].metric for t in tasks},
            "n_docs": {t: len(dense[t].docs) for t in tasks},
            "threshold": threshold,
            "bootstrap": {"resamples": resamples, "seed": seed, "level": level, "paired": True},
            "settings": settings,
            "search": store.get_meta("search") or {"method": "grid"},  # bisect: which values it evaluated
            "provenance": store.get_meta("provenance"),  # version, model source, dtype, device, command
        }
    )


def _curves(
    points: list[dict[str, Any]],
    dense: dict[str, TaskResult],
    sparse: dict[tuple[str, str, float], dict[str, TaskResult]],
    tasks: list[str],
) -> dict[tuple[str, str], Curve]:
    """Complete points grouped into one curve per (target, rule)."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in points:
        if p["complete"] and p["sparsity"] is not None and tasks:
            grouped.setdefault((p["target"], p["rule"]), []).append(p)
    curves = {}
    for (target, rule), pts in grouped.items():
        dense_scores, scores = {}, {}
        for t in tasks:
            dense_scores[t], scores[t] = _paired(dense[t], [sparse[(target, rule, p["value"])][t] for p in pts])
        curves[(target, rule)] = Curve(
            target,
            rule,
            [p["value"] for p in pts],
            np.array([p["sparsity"] for p in pts], dtype=float),
            {t: np.array([p["sparsity_per_task"][t] for p in pts], dtype=float) for t in tasks},
            dense_scores,
            scores,
        )
    return curves


def _critical_record(c: Critical, ci: tuple[float, float], params: list[float]) -> dict[str, Any]:
    return {
        "value": c.value,
        "grid_value": c.grid_value,
        "ci_low": ci[0],
        "ci_high": ci[1],
        "lower_bound": c.lower_bound,
        "grid_param": None if c.grid_index < 0 else params[c.grid_index],
    }


def _finite(obj: Any) -> Any:
    """NaN and ±Inf → None, so that the JSON is valid everywhere."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        return _finite(obj.item())
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
    "LEVEL",
    "RESAMPLES",
    "THRESHOLD",
    "Critical",
    "Curve",
    "CurveAnalysis",
    "achieved_sparsity",
    "agreement",
    "analyse_curve",
    "critical_sparsity",
    "critical_sparsity_batch",
    "mean_kl",
    "normalized_performance",
    "ratio",
    "resample_weights",
    "summarize",
    "write_summary",
]
