"""Outlier-aware top-p (`top_p_outlier`): massive entries are kept outside the budget top-p spends.

Per row, an entry with |v| > m × the row's median |v| (the lower median for an even length) is an
outlier and always kept; top-p with p then runs on the other entries alone, its L1 budget p·Σ|rest|
left undistorted by the few entries that would otherwise take most of it.
"""

from __future__ import annotations

import math

import torch

from actsparse.sparsity.rules import NonFiniteActivationError, _reference_row, check_finite, top_p_mask

__all__ = ["DEFAULT_M", "check_m", "outliers_mask", "reference_top_p_outlier_mask", "top_p_outlier_mask"]

DEFAULT_M = 100.0
"""Outlier factor over the row's median |v| (massive activations are 100–10 000× the median)."""


def check_m(m: float) -> float:
    """`m` as a float; ValueError unless it is finite and ≥ 1."""
    m = float(m)
    if not (math.isfinite(m) and m >= 1.0):
        raise ValueError(f"the outlier factor m must be a finite number ≥ 1, got {m}")
    return m


def outliers_mask(v: torch.Tensor, m: float) -> torch.Tensor:
    """Entries with |v| > m × the row's (lower) median |v|, compared in float64."""
    a = v.abs()
    median = a.median(dim=-1, keepdim=True).values  # the lower of the two middle values
    return a.double() > m * median.double()


def top_p_outlier_mask(v: torch.Tensor, p: float, m: float = DEFAULT_M) -> torch.Tensor:
    """Keep the outliers, and top-p (value p) of the remaining entries."""
    check_finite(v)
    m = check_m(m)
    if v.shape[-1] == 0:
        return torch.ones(v.shape, dtype=torch.bool, device=v.device)
    outlier = outliers_mask(v, m)
    rest = torch.where(outlier, torch.zeros((), dtype=v.dtype, device=v.device), v)
    # An outlier's zero in `rest` is kept by top-p only when the rest is all zero (then it keeps
    # everything, as the reference does on an all-zero rest); either way the outlier is kept.
    return outlier | top_p_mask(rest, p)


def reference_top_p_outlier_mask(v: torch.Tensor, p: float, m: float = DEFAULT_M) -> torch.Tensor:
    """Row by row in Python float64: split off the outliers, run the top-p reference on the rest."""
    values = v.detach().cpu().double()
    if not all(math.isfinite(x) for x in values.flatten().tolist()):
        raise NonFiniteActivationError("activation holds NaN or Inf")
    keep = []
    for row in values.reshape(-1, v.shape[-1]).tolist():
        a = [abs(x) for x in row]
        median = sorted(a)[(len(a) - 1) // 2]
        outlier = [x > m * median for x in a]
        rest = [x for x, o in zip(a, outlier, strict=True) if not o]
        kept_rest = iter(_reference_row(rest, "top_p", p) if rest else [])
        keep.append([True if o else next(kept_rest) for o in outlier])
    return torch.tensor(keep, dtype=torch.bool).reshape(v.shape).to(v.device)
