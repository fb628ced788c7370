"""Damage at matched sparsity: the proxies (mean KL to dense, answer agreement with dense) of two curves
read at the same achieved sparsity, with the paired-bootstrap interval of their difference.

Critical sparsity often cannot separate two curves (its intervals are wide at a few hundred documents);
the proxies are low-noise and answer a narrower question well: at 40 % sparsity, which of the two is
damaged less? Each is interpolated along its curve (dense prepended: KL 0, agreement 1) per resample,
with the same draw of documents for both curves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from actsparse.analysis.curves import Curve
from actsparse.analysis.statistics import LEVEL, mean_over_tasks, percentile_interval

MATCHED_SPARSITIES = (0.25, 0.40, 0.50)
PROXIES = ("kl", "agreement")
NAMES = {"kl": "mean KL", "agreement": "agreement"}


def _interpolate(x: np.ndarray, y: np.ndarray, at: Sequence[float], dense_level: float) -> np.ndarray:
    """y at each sparsity of `at` along one curve (x, y) with dense (0, dense_level) prepended; NaN beyond
    the curve's highest sparsity or where a point is NaN."""
    keep = np.isfinite(x) & np.isfinite(y)
    xs = np.concatenate([[0.0], x[keep]])
    ys = np.concatenate([[dense_level], y[keep]])
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    out = np.interp(at, xs, ys)
    return np.where(np.asarray(at) <= xs[-1], out, np.nan)


def measure_at(
    curve: Curve, at: Sequence[float], weights: Mapping[str, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The curve's measure at the sparsities `at`: ([k] on the documents held, [R, k] per resample)."""
    level = curve.criterion.dense_level
    point = _interpolate(curve.sparsity, curve.performance(), at, level)
    if weights is None:
        return point, np.zeros((0, len(at)))
    perf, x = curve.resampled(weights)
    mean = mean_over_tasks([perf[t] for t in sorted(perf)])
    x = np.broadcast_to(x, mean.shape)
    boot = np.stack([_interpolate(x[r], mean[r], at, level) for r in range(mean.shape[0])])
    return point, boot


def matched_difference(
    first: Curve,
    second: Curve,
    weights: Mapping[str, np.ndarray],
    at: Sequence[float] = MATCHED_SPARSITIES,
    level: float = LEVEL,
    names: tuple[str, str] | None = None,
) -> list[dict[str, Any]]:
    """`first` minus `second` on their (shared) measure at each sparsity both curves reach, with the
    paired interval; `better` names the curve damaged less where the interval excludes 0, else None.
    `names` are the two curves' names (default: their target/rule); two curves of one target and rule
    (two dtypes, runs or allocations) need names of their own, or `better` cannot tell them apart."""
    name_a, name_b = names or (f"{first.target}/{first.rule}", f"{second.target}/{second.rule}")
    point_a, boot_a = measure_at(first, at, weights)
    point_b, boot_b = measure_at(second, at, weights)
    lower_is_better = not first.criterion.higher_is_better
    out = []
    for k, s in enumerate(at):
        if not (np.isfinite(point_a[k]) and np.isfinite(point_b[k])):
            continue
        lo, hi = percentile_interval(boot_a[:, k] - boot_b[:, k], level)
        resolved = np.isfinite(lo) and (lo > 0 or hi < 0)
        a_better = (hi < 0) if lower_is_better else (lo > 0)
        out.append(
            {
                "sparsity": float(s),
                "value": float(point_a[k] - point_b[k]),
                "ci_low": lo,
                "ci_high": hi,
                "better": (name_a if a_better else name_b) if resolved else None,
            }
        )
    return out


def verdict(first: str, second: str, critical: dict[str, Any] | None, damage: Mapping[str, list[dict]]) -> str:
    """One line: which ordering of two curves is resolved, and by which measure (critical sparsity first,
    then damage at matched sparsity), or that none is."""
    parts = []
    if critical and critical.get("ci_low") is not None and critical.get("ci_high") is not None:
        lo, hi = critical["ci_low"], critical["ci_high"]
        if lo > 0 or hi < 0:
            ahead = first if lo > 0 else second
            parts.append(
                f"{ahead} has the higher critical sparsity ({100 * critical['value']:+.1f} pts "
                f"[{100 * lo:+.1f}, {100 * hi:+.1f}])"
            )
    for measure, rows in damage.items():
        won = [r for r in rows if r["better"] is not None]
        if won:
            names = {r["better"] for r in won}
            where = ", ".join(f"{100 * r['sparsity']:.0f} %" for r in won)
            if len(names) == 1:
                parts.append(f"{names.pop()} is damaged less by {NAMES[measure]} at {where}")
            else:
                parts.append(f"{NAMES[measure]} orders them differently at different sparsities ({where})")
    if not parts:
        reach = [r["sparsity"] for rows in damage.values() for r in rows]
        scope = "at the matched sparsities both reach" if reach else "(no sparsity that both curves reach)"
        return f"{first} vs {second}: no ordering resolved, by critical sparsity or by damage {scope}"
    return f"{first} vs {second}: " + "; ".join(parts)


__all__ = ["MATCHED_SPARSITIES", "NAMES", "PROXIES", "matched_difference", "measure_at", "verdict"]
