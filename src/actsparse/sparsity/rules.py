"""Sparsification rules: pure functions acting per token on the last dimension.

Each rule has a vectorised implementation (`top_p`, `top_k`, `max_p`, `threshold` and their
`*_mask` forms) and a slow, obviously-correct reference (`reference_*`) written as a plain loop
over rows in float64 Python arithmetic. The tests hold the fast paths to the references.
Every rule raises on NaN or ±Inf, which reads a value back: on CUDA each call waits for the GPU once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from actsparse.sparsity.registry import RULES as REGISTRY
from actsparse.sparsity.registry import get_rule
from actsparse.speed.kernels._common import NonFiniteActivationError, apply_mask, check_finite, sorted_top_p_mask

__all__ = [
    "RULES",
    "NonFiniteActivationError",
    "apply_mask",
    "check_finite",
    "masked",
    "max_p",
    "max_p_mask",
    "reference_mask",
    "threshold",
    "threshold_mask",
    "top_k",
    "top_k_mask",
    "top_p",
    "top_p_mask",
]


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


# --- masks (vectorised) -------------------------------------------------------------------------


def top_p_mask(v: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of largest-|v| entries whose |v| sum reaches p·‖v‖₁ (ties kept).

    Dispatches to the fastest exact implementation for the device (see `actsparse.speed.kernels`).
    """
    p = _check_fraction("p", p)
    from actsparse.speed.kernels.topp import top_p_mask_fast

    return top_p_mask_fast(v, p)


def top_p_mask_sort(v: torch.Tensor, p: float) -> torch.Tensor:
    """Sort-based top-p, the paper's way: a float64 cumulative sum over sorted |v|."""
    p = _check_fraction("p", p)
    return sorted_top_p_mask(v, p)


def top_k_mask(v: torch.Tensor, f: float) -> torch.Tensor:
    """Keep the k = max(1, int(n·f)) largest |v| entries, plus ties with the k-th.

    Uses the compiled radix select on CPU when available (see `actsparse.speed.kernels.topp`).
    """
    f = _check_fraction("f", f)
    k = max(1, int(v.shape[-1] * f))
    from actsparse.speed.kernels.topp import top_k_mask_fast

    keep = top_k_mask_fast(v, k)
    if keep is not None:
        return keep
    check_finite(v)
    a = v.abs()
    tau = a.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    return a >= tau


def max_p_mask(v: torch.Tensor, p: float) -> torch.Tensor:
    """Keep entries with |v| ≥ p·max|v| (compared in float64)."""
    p = _check_fraction("p", p)
    check_finite(v)
    a = v.abs()
    return a.double() >= p * a.amax(dim=-1, keepdim=True).double()


def threshold_mask(v: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Keep entries with |v| > τ (τ a calibrated per-layer constant, or one per last-dim entry)."""
    check_finite(v)
    tau_t = torch.as_tensor(tau, dtype=torch.float64, device=v.device)
    if bool((tau_t < 0).any()) or not bool(torch.isfinite(tau_t).all()):
        raise ValueError(f"threshold must be finite and ≥ 0, got {tau}")
    return v.abs().double() > tau_t


# --- rules (sparsified tensors) -----------------------------------------------------------------


def top_p(v: torch.Tensor, p: float) -> torch.Tensor:
    """Top-p sparsification of `v` along its last dimension (SPEC §2); mask and zeroing fused where possible."""
    p = _check_fraction("p", p)
    from actsparse.speed.kernels.topp import top_p_fast

    return top_p_fast(v, p)[0]


def top_k(v: torch.Tensor, f: float) -> torch.Tensor:
    """Top-k sparsification keeping a fraction `f` of entries (at least one)."""
    return apply_mask(v, top_k_mask(v, f))


def max_p(v: torch.Tensor, p: float) -> torch.Tensor:
    """Max-p sparsification: keep |v| ≥ p·max|v|."""
    return apply_mask(v, max_p_mask(v, p))


def threshold(v: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Static-threshold sparsification: keep |v| > τ."""
    return apply_mask(v, threshold_mask(v, tau))


RULES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    name: rule.mask_fn() for name, rule in REGISTRY.items() if not rule.method
}
"""Rule name → mask function (v, value) → bool keep-mask, of the rules that read v alone (from the registry)."""


def masked(v: torch.Tensor, rule: str, value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sparsified v, keep-mask) of `rule`; top-p fuses both into one pass where it can."""
    if rule == "top_p":
        from actsparse.speed.kernels.topp import top_p_fast

        return top_p_fast(v, _check_fraction("p", value))
    keep = get_rule(rule).mask_fn()(v, value)
    return apply_mask(v, keep), keep


# --- references (slow, obviously correct) -------------------------------------------------------


def _reference_row(row: list[float], rule: str, value: float) -> list[bool]:
    a = [abs(x) for x in row]
    if rule == "top_p":
        if value == 1.0:  # SPEC §2: every nonzero entry (a float64 sum absorbs 2⁻³⁰ beside 2³⁰)
            return [x > 0 for x in a] if any(a) else [True] * len(a)
        s = sorted(a, reverse=True)
        total = 0.0
        c = []
        for x in s:
            total += x
            c.append(total)
        target = value * c[-1]
        k = next(i for i, ci in enumerate(c) if ci >= target)
        tau = s[k]
        return [x >= tau for x in a]
    if rule == "top_k":
        k = max(1, int(len(a) * value))
        tau = sorted(a, reverse=True)[k - 1]
        return [x >= tau for x in a]
    if rule == "max_p":
        return [x >= value * max(a) for x in a]
    if rule == "threshold":
        return [x > value for x in a]
    raise ValueError(f"unknown rule {rule!r}")


def reference_mask(v: torch.Tensor, rule: str, value: float) -> torch.Tensor:
    """Keep-mask of `rule` computed row by row in Python float64; the tests' ground truth."""
    values = v.detach().cpu().double()
    if not all(math.isfinite(x) for x in values.flatten().tolist()):
        raise NonFiniteActivationError("activation holds NaN or Inf")
    rows = values.reshape(-1, v.shape[-1]).tolist()
    keep = [_reference_row(row, rule, value) for row in rows]
    return torch.tensor(keep, dtype=torch.bool).reshape(v.shape).to(v.device)
