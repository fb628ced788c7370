"""The statistics every analysis shares: ratios of paired means, bootstrap resamples of documents and
their percentile intervals. The one place in actsparse where a random generator is made or a bootstrap
drawn: curves, comparisons, retention and the report's bands all resample through these functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def generator(seed: int | Sequence[int]) -> np.random.Generator:
    """The random generator of a seed (or a sequence of ints, for independent streams per item)."""
    return np.random.default_rng(seed)


def ratio(numerator: np.ndarray | float, denominator: np.ndarray | float) -> np.ndarray:
    """numerator / denominator elementwise; NaN where the denominator is not positive (undefined there)."""
    s, d = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d > 0, s / np.where(d > 0, d, 1.0), np.nan)


def resample_weights(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, n] counts of each document in bootstrap resamples of n documents (with replacement)."""
    idx = rng.integers(0, n, size=(resamples, n))
    flat = (np.arange(resamples)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n)


def draw_weights(
    sizes: Mapping[str, int], resamples: int, seed: int | np.random.Generator = 0
) -> dict[str, np.ndarray]:
    """Bootstrap weights [R, n_t] per task (tasks in sorted order, so a seed gives the same draw)."""
    rng = seed if isinstance(seed, np.random.Generator) else generator(seed)
    return {t: resample_weights(sizes[t], resamples, rng).astype(float) for t in sorted(sizes)}


def scaled_weights(sizes: Mapping[str, int], factor: float, resamples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights [R, n_t] of resamples k = factor times larger than the documents held (multinomial counts
    over them): what a sample k times larger from the same documents' distribution would give."""
    rng = generator(seed)
    return {
        t: rng.multinomial(max(1, round(factor * n)), np.full(n, 1 / n), size=resamples).astype(float)
        for t, n in sorted(sizes.items())
    }


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` interval of bootstrap values (NaN resamples left out; NaN if all are)."""
    values = np.asarray(values, dtype=float)
    if not np.isfinite(values).any():
        return float("nan"), float("nan")
    lo, hi = np.nanpercentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def mean_over_tasks(per_task: Sequence[np.ndarray], shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Mean over the first axis of stacked per-task arrays, NaN entries left out (NaN where all are)."""
    if not per_task:
        return np.full(shape or (0,), np.nan)
    stack = np.stack([np.asarray(a, dtype=float) for a in per_task])
    count = (~np.isnan(stack)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.nansum(stack, axis=0) / np.maximum(count, 1), np.nan)


def paired_ratio(
    numerator: np.ndarray,
    denominator: np.ndarray,
    resamples: int = RESAMPLES,
    seed: int | Sequence[int] = 0,
    level: float = LEVEL,
) -> tuple[float, tuple[float, float], np.ndarray]:
    """mean(numerator) / mean(denominator) over paired documents, its percentile interval, and the [R]
    resampled ratios (the same draw of documents for both sides)."""
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    value = float(ratio(num.mean(), den.mean())) if len(num) else float("nan")
    w = resample_weights(len(num), resamples, generator(seed)).astype(float)
    boot = ratio(w @ num, w @ den)
    return value, percentile_interval(boot, level), boot


def paired_mean_difference(
    first: np.ndarray, second: np.ndarray, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> tuple[float, tuple[float, float]]:
    """mean(first − second) over paired documents and its percentile interval (one draw for both)."""
    diff = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    if not len(diff):
        return float("nan"), (float("nan"), float("nan"))
    w = resample_weights(len(diff), resamples, generator(seed)).astype(float)
    return float(diff.mean()), percentile_interval((w @ diff) / len(diff), level)


__all__ = [
    "LEVEL",
    "RESAMPLES",
    "draw_weights",
    "generator",
    "mean_over_tasks",
    "paired_mean_difference",
    "paired_ratio",
    "percentile_interval",
    "ratio",
    "resample_weights",
    "scaled_weights",
]
