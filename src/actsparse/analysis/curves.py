"""Curves and critical sparsity (SPEC §4): one (target, rule) across its sweep values with paired
per-document scores, the critical sparsity of a criterion with its paired-bootstrap interval, and the
paired difference of two curves analysed with the same draw of documents.

The criterion is the paper's by default: each task's own metric (acc or acc_norm, exact match, pass@1,
dense_bpb / sparse_bpb) as sparse / dense, averaged over tasks, ≥ 99 %. Answer agreement with dense and
the mean KL(dense ‖ sparse) may be asked for instead (`Criterion.parse("agreement:0.99")`,
`"kl:0.05"`); their crossings are named after them, never "the critical sparsity".
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from actsparse.analysis.statistics import (
    LEVEL,
    RESAMPLES,
    draw_weights,
    mean_over_tasks,
    percentile_interval,
    ratio,
)
from actsparse.evaluate.metrics import BITS_PER_BYTE
from actsparse.evaluate.results import SPARSITY_SEEN, SPARSITY_ZEROED, DocResult, TaskResult

THRESHOLD = 0.99
"""Normalised performance below which a point has lost more than 1 %."""

MEASURES = ("task", "agreement", "kl")
DEFAULT_THRESHOLDS = {"task": THRESHOLD, "agreement": 0.99, "kl": 0.05}
"""Each measure's threshold when none is given: the paper's 99 %, agreement ≥ 0.99, mean KL ≤ 0.05."""


@dataclass(frozen=True)
class Criterion:
    """What a curve's crossing is judged on: `task` (sparse / dense task metric ≥ threshold, the paper's
    critical sparsity), `agreement` (share of answers equal to dense ≥ threshold) or `kl` (token-weighted
    mean KL(dense ‖ sparse) ≤ threshold)."""

    measure: str = "task"
    threshold: float = THRESHOLD

    @classmethod
    def of(cls, measure: str) -> Criterion:
        """A measure's criterion at its default threshold (`DEFAULT_THRESHOLDS`)."""
        return cls(measure, DEFAULT_THRESHOLDS[measure])

    @classmethod
    def parse(cls, text: str) -> Criterion:
        """'task', 'task:0.99', 'agreement:0.99' or 'kl:0.05'; ValueError with the valid forms otherwise."""
        measure, _, value = text.partition(":")
        if measure not in MEASURES:
            raise ValueError(f"unknown criterion {text!r}; use task[:0.99], agreement[:0.99] or kl[:0.05]")
        try:
            threshold = float(value) if value else DEFAULT_THRESHOLDS[measure]
        except ValueError:
            raise ValueError(f"criterion {text!r}: {value!r} is not a number") from None
        if not (0 < threshold <= 1 if measure != "kl" else threshold > 0):
            raise ValueError(f"criterion {text!r}: the threshold must be in (0, 1] ({measure}) or > 0 (kl)")
        return cls(measure, threshold)

    @property
    def higher_is_better(self) -> bool:
        return self.measure != "kl"

    @property
    def dense_level(self) -> float:
        """The measure at the dense model itself (sparsity 0)."""
        return 0.0 if self.measure == "kl" else 1.0

    @property
    def is_paper(self) -> bool:
        return self.measure == "task" and self.threshold == THRESHOLD

    def name(self) -> str:
        """How tables and plots name the crossing."""
        if self.measure == "task":
            return "critical sparsity" if self.is_paper else f"critical sparsity (task metric ≥ {self.threshold:.1%})"
        return f"sparsity at {self.describe()}"

    def describe(self) -> str:
        return {
            "task": f"task metric ≥ {self.threshold:.0%} of dense",
            "agreement": f"agreement with dense ≥ {self.threshold:g}",
            "kl": f"mean KL ≤ {self.threshold:g}",
        }[self.measure]

    def text(self) -> str:
        return f"{self.measure}:{self.threshold:g}"


PAPER = Criterion()


def normalized_performance(scores: Mapping[str, float], dense: Mapping[str, float]) -> float:
    """Mean over tasks of sparse / dense score; tasks with a dense score of 0 are left out (NaN if all are)."""
    values = [float(ratio(scores[t], dense[t])) for t in scores]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


@dataclass(frozen=True)
class Critical:
    """Critical sparsity of one curve: interpolated value, last grid point before the crossing, bound flag."""

    value: float  # interpolated achieved sparsity where the measure crosses the threshold
    grid_value: float  # achieved sparsity of the last point before the crossing (the paper's reading)
    grid_index: int  # index (into the caller's points) of that point; -1 for the dense baseline
    lower_bound: bool  # the curve never crosses: `value` is the highest sparsity tried, a lower bound


def critical_sparsity_batch(
    sparsity: np.ndarray,
    performance: np.ndarray,
    threshold: float = THRESHOLD,
    dense_level: float = 1.0,
    higher_is_better: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Critical sparsity of many curves: performance is [R, m] (or [m]), sparsity [m] shared by every
    curve or [R, m] (resampled with the documents).

    Dense (0, dense_level) is prepended; points are taken in order of increasing sparsity (stable); the
    first point on the wrong side of `threshold` and the one before it are linearly interpolated. NaN
    never counts as a crossing. Returns (value, grid_value, grid_index, lower_bound), each of shape [R].
    """
    sign = 1.0 if higher_is_better else -1.0
    perf = sign * np.atleast_2d(np.asarray(performance, dtype=float))
    threshold, dense_level = sign * threshold, sign * dense_level
    x = np.asarray(sparsity, dtype=float)
    if x.shape[-1] != perf.shape[-1] or x.ndim > 2 or (x.ndim == 2 and x.shape[0] != perf.shape[0]):
        raise ValueError(f"{x.shape[-1]} sparsities but performance has {perf.shape[-1]} points")
    x = np.broadcast_to(x, perf.shape)
    rows = np.arange(perf.shape[0])
    order = np.argsort(x, axis=1, kind="stable")
    xs = np.concatenate([np.zeros((perf.shape[0], 1)), np.take_along_axis(x, order, axis=1)], axis=1)
    ps = np.concatenate([np.full((perf.shape[0], 1), dense_level), np.take_along_axis(perf, order, axis=1)], axis=1)
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
    sparsity: Sequence[float] | np.ndarray,
    performance: Sequence[float] | np.ndarray,
    threshold: float = THRESHOLD,
    dense_level: float = 1.0,
    higher_is_better: bool = True,
) -> Critical:
    """Critical sparsity of one curve as SPEC §4 defines it (see `critical_sparsity_batch`)."""
    value, grid, index, lower = critical_sparsity_batch(
        np.asarray(sparsity), np.asarray(performance), threshold, dense_level, higher_is_better
    )
    return Critical(float(value[0]), float(grid[0]), int(index[0]), bool(lower[0]))


@dataclass
class Curve:
    """One (target, rule) across its sweep values, with paired per-document values per task.

    The measure of a point on a task is a ratio of document sums, Σ scores / Σ dense (inverted for a loss
    such as bits per byte), so that every measure resamples the same way: the task metric (scores and
    dense are the documents' metric), agreement (scores: 1 where the answer is dense's; dense: 1) and the
    token-weighted mean KL (scores: KL · tokens; dense: tokens)."""

    target: str
    rule: str
    params: list[float]  # rule value of each point
    sparsity: np.ndarray  # [m] achieved sparsity of each point, pooled over the tasks' documents
    task_sparsity: dict[str, np.ndarray]  # task → [m] achieved sparsity on that task
    dense: dict[str, np.ndarray]  # task → [n_t] dense per-document values
    scores: dict[str, np.ndarray]  # task → [m, n_t] sparse per-document values, same documents
    lower_is_better: dict[str, bool] = field(default_factory=dict)  # task → its metric is a loss (bpb)
    doc_counts: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # task → [m, n_t] zeroed, seen
    criterion: Criterion = PAPER

    def _ratio(self, task: str, sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
        return ratio(dense, sparse) if self.lower_is_better.get(task, False) else ratio(sparse, dense)

    def task_performance(self) -> dict[str, np.ndarray]:
        """task → [m] the measure per point (sparse / dense for the task metric)."""
        return {t: self._ratio(t, self.scores[t].sum(axis=1), self.dense[t].sum()) for t in self.scores}

    def performance(self) -> np.ndarray:
        """[m] the measure averaged over tasks (normalised performance for the task metric)."""
        return mean_over_tasks(list(self.task_performance().values()), (len(self.params),))

    def resampled(self, weights: Mapping[str, np.ndarray], sparsity: bool = True) -> tuple[dict, np.ndarray]:
        """Per task [R, m] measure, and [R, m] (or [m]) achieved sparsity, under document weights [R, n_t]
        per task: the same weights for the dense run and every point (paired). With `sparsity` and
        per-document counts, each point's achieved sparsity is resampled too (pooled over tasks)."""
        tasks = sorted(self.scores)
        perf = {}
        for t in tasks:
            w = np.asarray(weights[t], dtype=float)
            perf[t] = self._ratio(t, w @ self.scores[t].T, (w @ self.dense[t])[:, None])
        if not sparsity or self.doc_counts is None:
            return perf, self.sparsity
        zeroed = sum(np.asarray(weights[t], dtype=float) @ self.doc_counts[t][0].T for t in tasks)
        seen = sum(np.asarray(weights[t], dtype=float) @ self.doc_counts[t][1].T for t in tasks)
        return perf, ratio(zeroed, seen)

    def critical(self, performance: np.ndarray | None = None, sparsity: np.ndarray | None = None) -> Critical:
        c = self.criterion
        perf = self.performance() if performance is None else performance
        x = self.sparsity if sparsity is None else sparsity
        return critical_sparsity(x, perf, c.threshold, c.dense_level, c.higher_is_better)

    def critical_batch(self, performance: np.ndarray, sparsity: np.ndarray) -> np.ndarray:
        c = self.criterion
        return critical_sparsity_batch(sparsity, performance, c.threshold, c.dense_level, c.higher_is_better)[0]


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


def bootstrap_critical(curve: Curve, weights: Mapping[str, np.ndarray], sparsity: bool = True) -> np.ndarray:
    """[R] critical sparsity of the curve under each resample's document weights (see `Curve.resampled`)."""
    perf, x = curve.resampled(weights, sparsity)
    if not perf:
        return np.zeros(0)
    return curve.critical_batch(mean_over_tasks([perf[t] for t in sorted(perf)]), x)


def analyse_curve(
    curve: Curve,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    weights: Mapping[str, np.ndarray] | None = None,
) -> CurveAnalysis:
    """Critical sparsity of the curve's criterion with a paired-bootstrap interval over documents.

    Each resample draws documents with replacement per task, the same draw for the dense run and every
    point (and, with per-document counts, for each point's achieved sparsity); the whole curve and its
    crossing are recomputed per resample (vectorised). `weights`: the draw to use (task → [R, n_t]), so
    that curves analysed with the same one can be compared pairwise.
    """
    tasks = sorted(curve.scores)
    if weights is None:
        weights = draw_weights({t: len(curve.dense[t]) for t in tasks}, resamples, seed)
    overall = curve.critical()
    if not tasks:
        return CurveAnalysis(overall, (overall.value, overall.value))
    samples = bootstrap_critical(curve, weights)
    fixed = None if curve.doc_counts is None else percentile_interval(bootstrap_critical(curve, weights, False), level)
    perf, _ = curve.resampled(weights, sparsity=False)
    per_task = {}
    task_perf = curve.task_performance()
    for task in tasks:
        if curve.doc_counts is not None:  # this task's own resampled sparsity
            zeroed, seen = curve.doc_counts[task]
            w = np.asarray(weights[task], dtype=float)
            tx = ratio(w @ zeroed.T, w @ seen.T)
        else:
            tx = curve.task_sparsity.get(task, curve.sparsity)
        values = curve.critical_batch(perf[task], tx)
        point = curve.critical(task_perf[task], curve.task_sparsity.get(task, curve.sparsity))
        per_task[task] = (point, percentile_interval(values, level))
    return CurveAnalysis(overall, percentile_interval(samples, level), per_task, samples, fixed)


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


def critical_record(c: Critical, ci: tuple[float, float], params: Sequence[float]) -> dict[str, Any]:
    """A critical sparsity and its interval as summary.json records it (`params`: the curve's rule values)."""
    return {
        "value": c.value,
        "grid_value": c.grid_value,
        "ci_low": ci[0],
        "ci_high": ci[1],
        "lower_bound": c.lower_bound,
        "grid_param": None if c.grid_index < 0 else params[c.grid_index],
    }


def achieved_sparsity(result: TaskResult) -> float:
    """The sparsity a point reached on one task, over all phases (NaN when its run recorded none)."""
    return float(result.sparsity.get("all", {}).get("sparsity", float("nan")))


def pooled_sparsity(
    task_sparsity: Mapping[str, np.ndarray], doc_counts: Mapping[str, tuple[np.ndarray, np.ndarray]] | None, m: int
) -> np.ndarray:
    """[m] achieved sparsity of each point pooled over its tasks' documents (Σ zeroed / Σ seen, SPEC §3);
    the mean over tasks of each task's sparsity when the documents carry no counts."""
    if doc_counts:
        zeroed = sum(z.sum(axis=1) for z, _ in doc_counts.values())
        seen = sum(s.sum(axis=1) for _, s in doc_counts.values())
        return ratio(zeroed, seen)
    return mean_over_tasks(list(task_sparsity.values()), (m,))


def task_measure_key(result: TaskResult) -> str | None:
    """The DocResult.metrics key behind a task's metric as the paper takes it: bits per byte for the bpb
    tasks (dense_bpb / sparse_bpb), else None (the document's score: acc, acc_norm, exact match, pass@1)."""
    if result.docs and all(BITS_PER_BYTE in d.metrics for d in result.docs):
        return BITS_PER_BYTE
    return None


def _doc_value(doc: DocResult, measure: str, key: str | None, dense_answer: str | None) -> float:
    if measure == "agreement":
        return 1.0 if dense_answer is None else float(doc.answer == dense_answer)
    if measure == "kl":
        tokens = float(max(doc.tokens, 1))
        if dense_answer is None:
            return tokens
        return float("nan") if doc.kl is None else float(doc.kl) * tokens
    return doc.score if key is None else float(doc.metrics.get(key, float("nan")))


def paired_values(
    dense: TaskResult,
    results: Sequence[TaskResult],
    measure: str = "task",
    within: Collection[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[int], tuple[np.ndarray, np.ndarray] | None]:
    """Dense [n] and sparse [m, n] per-document values of a measure (see `Curve`) over the documents every
    run has (and `within`, if given), their ids, and the sparse runs' per-document (zeroed, seen) counts
    [m, n] (None unless every one of those documents has them)."""
    shared = {d.doc_id for d in dense.docs}
    for r in results:
        shared &= {d.doc_id for d in r.docs}
    if within is not None:
        shared &= set(within)
    ids = sorted(shared)
    key = task_measure_key(dense) if measure == "task" else None
    answers = {d.doc_id: d.answer for d in dense.docs}

    def values(r: TaskResult, side: str, name: str | None = None) -> np.ndarray:
        by_id = {d.doc_id: d for d in r.docs}
        if name is not None:
            return np.array([float(by_id[i].metrics.get(name, np.nan)) for i in ids], dtype=float)
        return np.array(
            [_doc_value(by_id[i], measure, key, None if side == "dense" else answers[i]) for i in ids], dtype=float
        )

    dense_values = values(dense, "dense")
    if not results:
        return dense_values, np.zeros((0, len(ids))), ids, None
    counted = all(SPARSITY_SEEN in d.metrics for r in results for d in r.docs if d.doc_id in shared)
    counts = None
    if counted and ids:
        counts = (
            np.stack([values(r, "sparse", SPARSITY_ZEROED) for r in results]),
            np.stack([values(r, "sparse", SPARSITY_SEEN) for r in results]),
        )
    return dense_values, np.stack([values(r, "sparse") for r in results]), ids, counts


def build_curve(
    target: str,
    rule: str,
    params: Sequence[float],
    dense: Mapping[str, TaskResult],
    runs: Mapping[str, Sequence[TaskResult]],
    criterion: Criterion = PAPER,
    within: Mapping[str, Collection[int]] | None = None,
) -> tuple[Curve, dict[str, list[int]]]:
    """One curve from its dense run and its points' runs (in the order of `params`) per task, on the
    criterion's measure, over the documents every run has (and `within[task]`); with the ids of the
    documents it pairs per task."""
    dense_values, scores, ids, counts = {}, {}, {}, {}
    for t in dense:
        dense_values[t], scores[t], ids[t], counts[t] = paired_values(
            dense[t], runs[t], criterion.measure, None if within is None else within[t]
        )
    task_sparsity = {t: np.array([achieved_sparsity(r) for r in runs[t]], dtype=float) for t in dense}
    doc_counts = None if any(c is None for c in counts.values()) else {t: c for t, c in counts.items() if c}
    pooled = pooled_sparsity(task_sparsity, doc_counts, len(params))
    lower = {t: criterion.measure == "task" and task_measure_key(dense[t]) == BITS_PER_BYTE for t in dense}
    curve = Curve(target, rule, list(params), pooled, task_sparsity, dense_values, scores, lower, doc_counts, criterion)
    return curve, ids


__all__ = [
    "MEASURES",
    "PAPER",
    "THRESHOLD",
    "Criterion",
    "Critical",
    "Curve",
    "CurveAnalysis",
    "achieved_sparsity",
    "analyse_curve",
    "bootstrap_critical",
    "build_curve",
    "critical_record",
    "critical_sparsity",
    "critical_sparsity_batch",
    "normalized_performance",
    "paired_difference",
    "paired_values",
    "pooled_sparsity",
    "task_measure_key",
]
