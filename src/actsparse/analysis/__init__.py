"""Analysis of a sweep (SPEC §4): normalised performance, critical sparsity with a paired-bootstrap
interval over documents, mean KL and answer agreement per point, and `summary.json`.

The math is in pure numpy functions; `summarize` gathers a `RunStore` into curves and calls them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actsparse.evaluate.metrics import BITS_PER_BYTE, GOLD_PROBABILITY
from actsparse.evaluate.results import SPARSITY_SEEN, SPARSITY_ZEROED, DocResult, TaskResult
from actsparse.study.store import RunStore, atomic_path

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
    """Critical sparsity of many curves: performance is [R, m] (or [m]), sparsity [m] shared by every
    curve or [R, m] (resampled with the documents).

    Dense (0, 1.0) is prepended; points are taken in order of increasing sparsity (stable); the first
    point below `threshold` and the one before it are linearly interpolated. NaN performance never
    counts as a crossing. Returns (value, grid_value, grid_index, lower_bound), each of shape [R].
    """
    perf = np.atleast_2d(np.asarray(performance, dtype=float))
    x = np.asarray(sparsity, dtype=float)
    if x.shape[-1] != perf.shape[-1] or x.ndim > 2 or (x.ndim == 2 and x.shape[0] != perf.shape[0]):
        raise ValueError(f"{x.shape[-1]} sparsities but performance has {perf.shape[-1]} points")
    x = np.broadcast_to(x, perf.shape)
    rows = np.arange(perf.shape[0])
    order = np.argsort(x, axis=1, kind="stable")
    xs = np.concatenate([np.zeros((perf.shape[0], 1)), np.take_along_axis(x, order, axis=1)], axis=1)
    ps = np.concatenate([np.ones((perf.shape[0], 1)), np.take_along_axis(perf, order, axis=1)], axis=1)
    index = np.concatenate([np.full((perf.shape[0], 1), -1), order], axis=1)
    below = ps < threshold  # NaN compares False
    crossed = below.any(axis=1)
    last = xs.shape[1] - 1
    first = np.where(crossed, below.argmax(axis=1), last)
    prev = np.where(crossed, first - 1, last)
    p0, p1 = ps[rows, prev], ps[rows, first]
    x0, x1 = xs[rows, prev], xs[rows, first]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(p0 > p1, (p0 - threshold) / (p0 - p1), 0.0)
    frac = np.where(np.isfinite(frac), np.clip(frac, 0.0, 1.0), 0.0)
    value = np.where(crossed, x0 + frac * (x1 - x0), x0)
    return value, x0, index[rows, prev], np.logical_not(crossed)


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
    lower_is_better: dict[str, bool] = field(default_factory=dict)  # task → its score is a loss (bpb)
    doc_counts: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # task → [m, n_t] zeroed, seen

    def task_performance(self) -> dict[str, np.ndarray]:
        """task → [m] sparse / dense score (dense / sparse for a loss such as bits per byte)."""
        return {t: self._ratio(t, self.scores[t].mean(axis=1), self.dense[t].mean()) for t in self.scores}

    def _ratio(self, task: str, sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
        return ratio(dense, sparse) if self.lower_is_better.get(task, False) else ratio(sparse, dense)

    def resampled(self, weights: Mapping[str, np.ndarray], sparsity: bool = True) -> tuple[dict, np.ndarray]:
        """Per task [R, m] performance, and [R, m] (or [m]) achieved sparsity, under document weights
        [R, n_t] per task: the same weights for the dense run and every point (paired). With
        `sparsity` and per-document counts, each point's achieved sparsity is resampled too."""
        tasks = sorted(self.scores)
        perf = {}
        for t in tasks:
            w = np.asarray(weights[t], dtype=float)
            perf[t] = self._ratio(t, w @ self.scores[t].T, (w @ self.dense[t])[:, None])
        if not sparsity or self.doc_counts is None:
            return perf, self.sparsity
        per_task = []
        for t in tasks:
            zeroed, seen = self.doc_counts[t]
            w = np.asarray(weights[t], dtype=float)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_task.append((w @ zeroed.T) / (w @ seen.T))
        return perf, np.mean(per_task, axis=0)

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
    """Critical sparsity of a curve, overall and per task, each with its bootstrap interval.

    `samples`: the critical sparsity of every resample (for paired differences between curves drawn
    with the same weights); `ci_fixed_sparsity`: the interval with each point's sparsity held fixed."""

    critical: Critical
    ci: tuple[float, float]
    per_task: dict[str, tuple[Critical, tuple[float, float]]] = field(default_factory=dict)
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ci_fixed_sparsity: tuple[float, float] | None = None

    @property
    def half_width(self) -> float:
        return (self.ci[1] - self.ci[0]) / 2


def draw_weights(sizes: Mapping[str, int], resamples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Bootstrap weights [R, n_t] per task (tasks in sorted order, so a seed gives the same draw)."""
    return {t: resample_weights(sizes[t], resamples, rng) for t in sorted(sizes)}


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` interval of bootstrap values (NaN resamples left out)."""
    values = np.asarray(values, dtype=float)
    if not np.isfinite(values).any():
        return float("nan"), float("nan")
    lo, hi = np.nanpercentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def _mean_over_tasks(per_task: Sequence[np.ndarray]) -> np.ndarray:
    boot = np.stack(per_task)  # [tasks, R, m]
    count = (~np.isnan(boot)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.nansum(boot, axis=0) / np.maximum(count, 1), np.nan)


def bootstrap_critical(
    curve: Curve, weights: Mapping[str, np.ndarray], threshold: float = THRESHOLD, sparsity: bool = True
) -> np.ndarray:
    """[R] critical sparsity of the curve under each resample's document weights (see `Curve.resampled`)."""
    perf, x = curve.resampled(weights, sparsity)
    if not perf:
        return np.zeros(0)
    return critical_sparsity_batch(x, _mean_over_tasks([perf[t] for t in sorted(perf)]), threshold)[0]


def analyse_curve(
    curve: Curve,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    threshold: float = THRESHOLD,
    weights: Mapping[str, np.ndarray] | None = None,
) -> CurveAnalysis:
    """Critical sparsity with a paired-bootstrap interval over documents.

    Each resample draws documents with replacement per task, the same draw for the dense run and
    every point (and, with per-document counts, for each point's achieved sparsity); the whole curve
    and its critical sparsity are recomputed per resample (vectorised). `weights`: the draw to use
    (task → [R, n_t]), so that curves analysed with the same one can be compared pairwise.
    """
    tasks = sorted(curve.scores)
    if weights is None:
        weights = draw_weights({t: len(curve.dense[t]) for t in tasks}, resamples, np.random.default_rng(seed))
    overall = critical_sparsity(curve.sparsity, curve.performance(), threshold)
    if not tasks:
        return CurveAnalysis(overall, (overall.value, overall.value))
    samples = bootstrap_critical(curve, weights, threshold)
    fixed = (
        None
        if curve.doc_counts is None
        else percentile_interval(bootstrap_critical(curve, weights, threshold, sparsity=False), level)
    )
    perf, _ = curve.resampled(weights)
    per_task = {}
    task_perf = curve.task_performance()
    for task in tasks:
        if curve.doc_counts is not None:  # this task's own resampled sparsity
            zeroed, seen = curve.doc_counts[task]
            w = np.asarray(weights[task], dtype=float)
            with np.errstate(invalid="ignore", divide="ignore"):
                tx = (w @ zeroed.T) / (w @ seen.T)
        else:
            tx = curve.task_sparsity.get(task, curve.sparsity)
        values = critical_sparsity_batch(tx, perf[task], threshold)[0]
        point = critical_sparsity(curve.task_sparsity.get(task, curve.sparsity), task_perf[task], threshold)
        per_task[task] = (point, percentile_interval(values, level))
    return CurveAnalysis(overall, percentile_interval(samples, level), per_task, samples, fixed)


POWER_TARGET = 0.02
"""Half-width of the critical sparsity's interval (in sparsity) that the power report aims at: ±2 points."""


def predicted_documents(
    curve: Curve,
    target: float = POWER_TARGET,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    threshold: float = THRESHOLD,
    most: int = 1 << 20,
) -> int | None:
    """Documents per task at which the bootstrap predicts a critical-sparsity half-width ≤ `target`.

    Resamples of k·n_t documents with replacement (multinomial counts over the n_t documents held)
    stand for a sample k times larger from the same documents' distribution; k is doubled until the
    half-width is under `target`, then bisected. Returns the largest task's count (None beyond `most`).
    """
    tasks = sorted(curve.scores)
    if not tasks:
        return None
    sizes = {t: len(curve.dense[t]) for t in tasks}
    largest = max(sizes.values())

    def half_width(factor: float) -> float:
        rng = np.random.default_rng(seed)  # the same stream at every size: a smooth search
        weights = {
            t: rng.multinomial(max(1, round(factor * sizes[t])), np.full(sizes[t], 1 / sizes[t]), size=resamples)
            for t in tasks
        }
        lo, hi = percentile_interval(bootstrap_critical(curve, weights, threshold), level)
        return (hi - lo) / 2 if math.isfinite(lo) else math.inf

    if half_width(1.0) <= target:
        return largest
    low, high = 1.0, 2.0
    while half_width(high) > target:
        low, high = high, 2 * high
        if high * largest > most:
            return None
    while high * largest - low * largest > max(1.0, 0.05 * low * largest):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if half_width(mid) > target else (low, mid)
    return math.ceil(high * largest)


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


def low_noise_metric(result: TaskResult) -> str | None:
    """The task's low-noise measure, a DocResult.metrics key every document has: bits per byte where
    the task reports it, else the gold probability; None when it has neither (its score stands in)."""
    for key in (BITS_PER_BYTE, GOLD_PROBABILITY):
        if result.docs and all(key in d.metrics for d in result.docs):
            return key
    return None


def _value(doc: DocResult, key: str | None) -> float:
    return doc.score if key is None else float(doc.metrics.get(key, float("nan")))


def _paired(
    dense: TaskResult, results: Sequence[TaskResult], key: str | None = None, within: Collection[int] | None = None
) -> tuple[np.ndarray, np.ndarray, list[int], tuple[np.ndarray, np.ndarray] | None]:
    """Dense [n] and sparse [m, n] per-document values (the score, or `key` of the metrics) over the
    documents every run has (and `within`, if given), their ids, and the sparse runs' per-document
    (zeroed, seen) counts [m, n] (None unless every one of those documents has them)."""
    shared = {d.doc_id for d in dense.docs}
    for r in results:
        shared &= {d.doc_id for d in r.docs}
    if within is not None:
        shared &= set(within)
    ids = sorted(shared)

    def values(r: TaskResult, name: str | None) -> np.ndarray:
        by_id = {d.doc_id: _value(d, name) for d in r.docs}
        return np.array([by_id[i] for i in ids], dtype=float)

    if not results:
        return values(dense, key), np.zeros((0, len(ids))), ids, None
    counted = all(SPARSITY_SEEN in d.metrics for r in results for d in r.docs if d.doc_id in shared)
    counts = None
    if counted and ids:
        counts = (
            np.stack([values(r, SPARSITY_ZEROED) for r in results]),
            np.stack([values(r, SPARSITY_SEEN) for r in results]),
        )
    return values(dense, key), np.stack([values(r, key) for r in results]), ids, counts


def grouped_results(
    store: RunStore,
) -> tuple[dict[str, TaskResult], dict[tuple[str, str, float], dict[str, TaskResult]]]:
    """A store's results: dense by task, and sparse by (target, rule, value), then task."""
    dense: dict[str, TaskResult] = {}
    sparse: dict[tuple[str, str, float], dict[str, TaskResult]] = {}
    for key, result in store.items():
        if key.is_dense:
            dense[key.task] = result
        else:
            sparse.setdefault((key.target, key.rule, key.value), {})[key.task] = result
    return dense, sparse


def summarize(
    store: RunStore,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    threshold: float = THRESHOLD,
    power: bool = True,
) -> dict[str, Any]:
    """Everything the report needs, as a JSON-ready dict (the content of summary.json).
    `power`: also predict the documents each curve needs for a ±2-point interval (the slow part)."""
    dense, sparse = grouped_results(store)
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

    low_noise = {t: low_noise_metric(dense[t]) for t in tasks}
    for p in points:
        by_task = sparse[(p["target"], p["rule"], p["value"])]
        p["scores_low_noise"] = {t: _mean_of(by_task[t], low_noise[t]) for t in p["scores"]}
        dense_low = {t: _mean_of(dense[t], low_noise[t]) for t in p["scores"]}
        lower = {t: low_noise[t] == BITS_PER_BYTE for t in p["scores"]}
        p["normalized_low_noise"] = normalized_performance(
            {t: 1 / v if lower[t] and v else v for t, v in p["scores_low_noise"].items()},
            {t: 1 / v if lower[t] and v else v for t, v in dense_low.items()},
        )
    dense_ids = {t: sorted(d.doc_id for d in dense[t].docs) for t in tasks}
    weights = draw_weights({t: len(dense_ids[t]) for t in tasks}, resamples, np.random.default_rng(seed))
    measures: dict[str, dict[str, str | None]] = {"accuracy": dict.fromkeys(tasks), "low_noise": low_noise}
    results: dict[str, dict[tuple[str, str], CurveAnalysis]] = {}
    records: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    power_curves: dict[str, Any] = {}
    resampled_sparsity = True
    for measure, keys in measures.items():
        critical_m: dict[str, Any] = {}
        per_task_m: dict[str, Any] = {}
        results[measure] = {}
        for (target, rule), (curve, ids) in _curves(points, dense, sparse, tasks, keys).items():
            mine = {t: weights[t][:, np.searchsorted(dense_ids[t], ids[t])] for t in tasks}
            analysis = analyse_curve(curve, resamples, seed, level, threshold, weights=mine)
            resampled_sparsity &= curve.doc_counts is not None
            results[measure][(target, rule)] = analysis
            label = f"{target}/{rule}"
            needed = predicted_documents(curve, POWER_TARGET, resamples, seed, level, threshold) if power else None
            critical_m[label] = critical_record(analysis.critical, analysis.ci, curve.params) | {
                "half_width": analysis.half_width,
                "ci_fixed_sparsity": analysis.ci_fixed_sparsity,
            }
            power_curves.setdefault(label, {})[measure] = {
                "half_width": analysis.half_width,
                "documents": max(len(v) for v in ids.values()),
                "documents_needed": needed,
            }
            per_task_m[label] = {t: critical_record(c, ci, curve.params) for t, (c, ci) in analysis.per_task.items()}
        records[measure] = (critical_m, per_task_m)
    critical, critical_per_task = records["accuracy"]

    return _finite(
        {
            "model": settings.get("model"),
            "tasks": tasks,
            "dense": {t: dense[t].score for t in tasks},
            "points": points,
            "critical_sparsity": critical,
            "critical_sparsity_per_task": critical_per_task,
            "critical_sparsity_low_noise": records["low_noise"][0],
            "critical_sparsity_low_noise_per_task": records["low_noise"][1],
            "low_noise_metrics": {t: low_noise[t] or dense[t].metric for t in tasks},
            "headline": "low_noise",
            "paired_differences": paired_differences(results, level),
            "power": {"target_half_width": POWER_TARGET, "curves": power_curves},
            "sparsity_resampled": bool(results["accuracy"]) and resampled_sparsity,
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


def _mean_of(result: TaskResult, key: str | None) -> float:
    values = [_value(d, key) for d in result.docs]
    return float(np.mean(values)) if values else float("nan")


def _curves(
    points: list[dict[str, Any]],
    dense: dict[str, TaskResult],
    sparse: dict[tuple[str, str, float], dict[str, TaskResult]],
    tasks: list[str],
    keys: Mapping[str, str | None] | None = None,
) -> dict[tuple[str, str], tuple[Curve, dict[str, list[int]]]]:
    """Complete points grouped into one curve per (target, rule) (see `build_curve`)."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in points:
        if p["complete"] and p["sparsity"] is not None and tasks:
            grouped.setdefault((p["target"], p["rule"]), []).append(p)
    return {
        (target, rule): build_curve(
            target,
            rule,
            [p["value"] for p in pts],
            {t: dense[t] for t in tasks},
            {t: [sparse[(target, rule, p["value"])][t] for p in pts] for t in tasks},
            keys,
        )
        for (target, rule), pts in grouped.items()
    }


def build_curve(
    target: str,
    rule: str,
    params: Sequence[float],
    dense: Mapping[str, TaskResult],
    runs: Mapping[str, Sequence[TaskResult]],
    keys: Mapping[str, str | None] | None = None,
    within: Mapping[str, Collection[int]] | None = None,
) -> tuple[Curve, dict[str, list[int]]]:
    """One curve from its dense run and its points' runs (in the order of `params`) per task, on each
    task's score or on the metric `keys[task]`, over the documents every run has (and `within[task]`);
    with the ids of the documents it pairs per task."""
    keys = keys or {}
    dense_scores, scores, ids, counts = {}, {}, {}, {}
    for t in dense:
        dense_scores[t], scores[t], ids[t], counts[t] = _paired(
            dense[t], runs[t], keys.get(t), None if within is None else within[t]
        )
    task_sparsity = {t: np.array([achieved_sparsity(r) for r in runs[t]], dtype=float) for t in dense}
    doc_counts = None if any(c is None for c in counts.values()) else counts
    curve = Curve(
        target,
        rule,
        list(params),
        _nanmean_stack(list(task_sparsity.values()), len(params)),
        task_sparsity,
        dense_scores,
        scores,
        {t: keys.get(t) == BITS_PER_BYTE for t in dense},
        doc_counts,  # type: ignore[arg-type]
    )
    return curve, ids


def paired_differences(
    results: Mapping[str, Mapping[tuple[str, str], CurveAnalysis]], level: float = LEVEL
) -> dict[str, Any]:
    """Critical sparsity of one target minus another's (same rule), per measure, with the paired
    interval: both curves were resampled with the same document weights, so each resample's
    difference is the bootstrap of the difference. Targets in SPEC order, the later one first."""
    from actsparse.sparsity.spec import TARGETS

    out: dict[str, Any] = {}
    for measure, by_curve in results.items():
        for (a, rule), first in by_curve.items():
            for (b, rule_b), second in by_curve.items():
                if rule_b != rule or TARGETS.index(a) <= TARGETS.index(b):
                    continue
                if first.samples.shape == second.samples.shape:
                    out.setdefault(f"{a} − {b} ({rule})", {})[measure] = paired_difference(first, second, level)
    return out


def paired_difference(first: CurveAnalysis, second: CurveAnalysis, level: float = LEVEL) -> dict[str, Any]:
    """`first`'s critical sparsity minus `second`'s, with the interval of the per-resample differences
    (both analysed with the same document weights, so that is the bootstrap of the difference)."""
    lo, hi = percentile_interval(first.samples - second.samples, level)
    return {
        "value": first.critical.value - second.critical.value,
        "ci_low": lo,
        "ci_high": hi,
        "lower_bound": first.critical.lower_bound or second.critical.lower_bound,
    }


def critical_record(c: Critical, ci: tuple[float, float], params: list[float]) -> dict[str, Any]:
    """A critical sparsity and its interval as summary.json records it (`params`: the curve's rule values)."""
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
    "bootstrap_critical",
    "build_curve",
    "critical_record",
    "critical_sparsity",
    "critical_sparsity_batch",
    "draw_weights",
    "low_noise_metric",
    "mean_kl",
    "normalized_performance",
    "paired_difference",
    "paired_differences",
    "percentile_interval",
    "predicted_documents",
    "ratio",
    "resample_weights",
    "summarize",
    "write_summary",
]
