"""Power: how many documents a curve needs for its critical sparsity's interval to reach a half-width."""

from __future__ import annotations

import math

from actsparse.analysis.curves import Curve, bootstrap_critical
from actsparse.analysis.statistics import LEVEL, RESAMPLES, percentile_interval, scaled_weights

POWER_TARGET = 0.02
"""Half-width of the critical sparsity's interval (in sparsity) that the power report aims at: ±2 points."""


def predicted_documents(
    curve: Curve,
    target: float = POWER_TARGET,
    resamples: int = RESAMPLES,
    seed: int = 0,
    level: float = LEVEL,
    most: int = 1 << 20,
) -> int | None:
    """Documents per task at which the bootstrap predicts a critical-sparsity half-width ≤ `target`.

    Resamples of k·n_t documents with replacement stand for a sample k times larger from the same
    documents' distribution (`scaled_weights`); k is doubled until the half-width is under `target`, then
    bisected. Returns the largest task's count (None beyond `most`).
    """
    sizes = {t: len(curve.dense[t]) for t in sorted(curve.scores)}
    if not sizes:
        return None
    largest = max(sizes.values())

    def half_width(factor: float) -> float:  # the same stream at every size: a smooth search
        lo, hi = percentile_interval(bootstrap_critical(curve, scaled_weights(sizes, factor, resamples, seed)), level)
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


__all__ = ["POWER_TARGET", "predicted_documents"]
