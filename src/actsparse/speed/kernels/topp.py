"""Exact top-p and top-k masks without a full sort, dispatched by device.

All paths find, per row, τ = the largest |v| whose "mass at or above it" reaches the target (p·‖v‖₁ for
top-p, k entries for top-k) and keep |v| ≥ τ, which is the sort-based reference of SPEC §2 up to the
order of float64 additions. CUDA: the Triton kernel (`topp_triton`); CPU: the compiled radix select
(`topp_cpu`), else the vectorised PyTorch radix select below.
"""

from __future__ import annotations

import torch

from actsparse.speed.kernels import topp_cpu
from actsparse.speed.kernels._common import apply_mask, keep_nonzero, raise_non_finite, sorted_top_p_mask

__all__ = [
    "raise_non_finite",
    "top_k_mask_fast",
    "top_p_fast",
    "top_p_mask_fast",
    "top_p_mask_host",
    "top_p_mask_op",
    "top_p_mask_radix",
]

_LEVELS = ((23, 256), (15, 256), (7, 256), (0, 128))  # (shift, buckets): 8 + 8 + 8 + 7 bits of the key
_FINITE_LIMIT = 0x7F800000  # bit pattern of +Inf: every key at or above it is Inf or NaN
_SMALL_FLOATS = (torch.float32, torch.bfloat16, torch.float16)  # exactly representable in float32


def _first_crossing(desc: torch.Tensor, base: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first bucket (highest first) where base + the mass of buckets so far reaches target.

    Returns its position and the mass before it; falls back to the last positive bucket when rounding
    keeps the sums short of target.
    """
    cum = base.unsqueeze(-1) + desc.cumsum(-1)
    positive = desc > 0
    positions = torch.arange(desc.shape[-1], device=desc.device)
    last_positive = torch.where(positive, positions, -1).amax(-1)
    first_hit = torch.where((cum >= target.unsqueeze(-1)) & positive, positions, desc.shape[-1]).amin(-1)
    pos = torch.where(first_hit < desc.shape[-1], first_hit, last_positive.clamp(min=0))
    before = cum.gather(-1, (pos - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return pos, torch.where(pos == 0, base, before)


def top_p_mask_radix(v: torch.Tensor, p: float) -> torch.Tensor:
    """Exact top-p keep-mask by a radix select on the bits of |v| (8 + 8 + 8 + 7), vectorised over rows.

    Pure PyTorch (any device; float32, bfloat16 or float16); the fallback of the compiled and Triton kernels.
    Waits for the device once, to check for NaN/Inf.
    """
    n = v.shape[-1]
    rows = v.shape[:-1].numel()
    a = v.detach().reshape(rows, n).abs().float()
    if a.numel() == 0:
        return torch.ones(v.shape, dtype=torch.bool, device=v.device)
    key = a.view(torch.int32)
    if int(key.amax()) >= _FINITE_LIMIT:
        raise_non_finite()
    if p == 1.0:  # every nonzero entry: float64 sums absorb tiny entries beside huge ones (SPEC §2)
        return keep_nonzero(v.detach())
    w = a.double()
    target: torch.Tensor | None = None
    prefix = torch.zeros(rows, dtype=torch.int32, device=a.device)
    above = torch.zeros(rows, dtype=torch.float64, device=a.device)
    inside: torch.Tensor | None = None
    for shift, buckets in _LEVELS:
        rev = (buckets - 1) - ((key >> shift) & (buckets - 1))  # highest bucket first
        mass = w if inside is None else torch.where(inside, w, 0.0)
        desc = torch.zeros(rows, buckets, dtype=torch.float64, device=a.device).scatter_add_(1, rev.long(), mass)
        if target is None:  # the total as the first level's running sum ends, so that p = 1 crosses exactly
            target = p * desc.cumsum(-1)[:, -1]
        pos, above = _first_crossing(desc, above, target)
        prefix |= ((buckets - 1) - pos.int()) << shift
        match = rev == pos.int().unsqueeze(-1)
        inside = match if inside is None else inside & match
    assert target is not None
    tau = torch.where(target > 0, prefix.view(torch.float32), a.amax(-1))
    return (a >= tau.unsqueeze(-1)).reshape(v.shape)


def top_p_mask_host(v: torch.Tensor, p: float) -> torch.Tensor:
    """Exact top-p keep-mask without Triton: the compiled kernel on CPU, else the PyTorch radix select
    (the sort-based rule for float64, whose values float32 radix keys cannot hold)."""
    if v.dtype not in _SMALL_FLOATS:
        return sorted_top_p_mask(v, p)
    if v.device.type == "cpu" and topp_cpu.available():
        keep, _, finite = topp_cpu.select_mask(v, topk=False, value=p)
        if not finite:
            raise_non_finite()
        return keep
    return top_p_mask_radix(v, p)


def top_p_mask_fast(v: torch.Tensor, p: float) -> torch.Tensor:
    """Exact top-p keep-mask of `v` along its last dimension (`p` already validated)."""
    if v.is_cuda:
        return top_p_mask_op(v, p)
    return top_p_mask_host(v, p)


def top_k_mask_fast(v: torch.Tensor, k: int) -> torch.Tensor | None:
    """Keep-mask of the k largest |v| (ties with the k-th kept) by radix select; None where no fast path applies."""
    if v.device.type != "cpu" or v.dtype not in _SMALL_FLOATS or not topp_cpu.available():
        return None
    keep, _, finite = topp_cpu.select_mask(v, topk=True, value=k)
    if not finite:
        raise_non_finite()
    return keep


def top_p_fast(v: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p sparsified `v` and its keep-mask; on CPU one fused pass writes both (`p` already validated).

    Where autograd must see the zeroing, it is done by `rules.apply_mask` instead.
    """
    differentiable = v.requires_grad and torch.is_grad_enabled()
    if v.device.type == "cpu" and v.dtype in _SMALL_FLOATS and not differentiable and topp_cpu.available():
        keep, sparse, finite = topp_cpu.select_mask(v, topk=False, value=p, sparsify=True)
        if not finite:
            raise_non_finite()
        assert sparse is not None
        return sparse, keep
    keep = top_p_mask_fast(v, p)
    return apply_mask(v, keep), keep


@torch.library.custom_op("actsparse::top_p_mask", mutates_args=())
def top_p_mask_op(v: torch.Tensor, p: float) -> torch.Tensor:
    """Exact top-p keep-mask along the last dimension (`torch.ops.actsparse.top_p_mask`); Triton on CUDA."""
    return top_p_mask_host(v, p)


@top_p_mask_op.register_kernel("cuda")
def _top_p_mask_cuda(v: torch.Tensor, p: float) -> torch.Tensor:
    from actsparse.speed.kernels import topp_triton  # imports triton: only where a CUDA tensor needs it

    if topp_triton.triton is not None and v.dtype in _SMALL_FLOATS:
        return topp_triton.top_p_mask_triton(v, p)
    return top_p_mask_host(v, p)


@top_p_mask_op.register_fake
def _top_p_mask_fake(v: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(v, dtype=torch.bool)
