"""What the kernels share with the rest of the package, defined here so that `kernels/` imports nothing above it.

The error for NaN/Inf activations, the mask helpers every rule uses, the sort-based top-p (the fallback the
radix paths cannot replace for float64) and the weights of one gated FFN. `actsparse.sparsity.rules` and
`actsparse.models.adapters` re-export them under their usual names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "GatedWeights",
    "NonFiniteActivationError",
    "apply_mask",
    "check_finite",
    "keep_nonzero",
    "raise_non_finite",
    "sorted_top_p_mask",
]


class NonFiniteActivationError(ValueError):
    """An activation holds NaN or ±Inf, so no rule can give a meaningful result."""


def raise_non_finite() -> None:
    """Raise `NonFiniteActivationError` (what every kernel does when it saw NaN or Inf)."""
    raise NonFiniteActivationError("activation holds NaN or Inf")


def check_finite(v: torch.Tensor) -> None:
    """Raise `NonFiniteActivationError` if `v` holds NaN or ±Inf (a host sync: it reads the answer)."""
    if not bool(torch.isfinite(v).all()):
        raise_non_finite()


def apply_mask(v: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the entries of `v` where `keep` is False (same dtype and device)."""
    return torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device))


def sorted_top_p_mask(v: torch.Tensor, p: float) -> torch.Tensor:
    """Sort-based top-p, the paper's way: a float64 cumulative sum over sorted |v| (`p` already validated).

    p = 1 keeps every nonzero entry (SPEC §2): a float64 sum can absorb a tiny entry beside a huge one.
    """
    check_finite(v)
    if p == 1.0:
        return keep_nonzero(v)
    a = v.abs()
    a_sorted = a.sort(dim=-1, descending=True).values
    c = a_sorted.double().cumsum(dim=-1)
    target = p * c[..., -1:]
    k = (c < target).sum(dim=-1, keepdim=True).clamp_(max=a.shape[-1] - 1)
    tau = a_sorted.gather(-1, k)
    return a >= tau


def keep_nonzero(v: torch.Tensor) -> torch.Tensor:
    """Top-p at p = 1: every nonzero entry, and every entry of an all-zero row (left as it is)."""
    a = v.abs()
    if a.numel() == 0:
        return torch.ones(v.shape, dtype=torch.bool, device=v.device)
    return (a > 0) | (a.amax(dim=-1, keepdim=True) == 0)


@dataclass(frozen=True)
class GatedWeights:
    """The three matrices of one gated FFN, in nn.Linear layout ([out, in]), and its activation."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    act: Callable[[torch.Tensor], torch.Tensor]
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
