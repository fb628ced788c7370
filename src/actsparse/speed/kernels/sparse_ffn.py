"""Sparse decode kernels: products that read only the weight rows of nonzero activations.

Weights are read transposed ([in, out], see `SparseFFNWeights`), so the row of a zeroed input
entry is one contiguous run of memory that is never read; `layout` takes views where the model's
weights already have that layout (`accelerate` re-lays them out in place, see `kernels.relayout`).
`masked_rows_matmul(x, keep, w_t)` equals
`(x·keep) @ w_t` (its reference, `masked_rows_matmul_reference`) and picks the fastest path for the device:
on CPU a weighted `embedding_bag` over the active rows (one pass, no copy) for one token and a
gather of the union of active rows for a few; on CUDA the Triton kernel of `sparse_ffn_triton`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from actsparse.speed.kernels._common import GatedWeights

__all__ = [
    "SparseFFNWeights",
    "layout",
    "masked_rows_matmul",
    "masked_rows_matmul_reference",
    "sparse_ffn",
    "sparse_ffn_reference",
]

Masker = Callable[[str, torch.Tensor], "torch.Tensor | None"]
"""(vector name, activation) → its keep-mask under the rule, or None for a vector left dense."""


@dataclass
class SparseFFNWeights:
    """One gated FFN laid out for sparse decode; a matrix is None where its input stays dense."""

    gate_t: torch.Tensor | None  # [h, d]: W_g transposed, one row (contiguous) per input entry
    up_t: torch.Tensor | None  # [h, d]: W_u transposed
    down_t: torch.Tensor | None  # [d, h]: W_d transposed, one row per intermediate entry
    dense: GatedWeights  # the model's own weights, for the products that stay dense

    @property
    def intermediate_size(self) -> int:
        return self.dense.gate.shape[0]


def rows_of(w: torch.Tensor) -> torch.Tensor:
    """wᵀ [in, out] with contiguous rows: a view when w's storage already holds it, else a copy."""
    t = w.detach().t()
    return t if t.stride(1) == 1 and t.stride(0) >= t.shape[1] else t.contiguous()


def layout(weights: GatedWeights, sparse_input: bool, sparse_intermediate: bool) -> SparseFFNWeights:
    """The transposed matrices whose input is sparse: views of weights re-laid out in place, else copies."""
    gate_t, up_t = (rows_of(weights.gate), rows_of(weights.up)) if sparse_input else (None, None)
    down_t = rows_of(weights.down) if sparse_intermediate else None
    return SparseFFNWeights(gate_t, up_t, down_t, weights)


def _cpu_rows_matmul(x: torch.Tensor, keep: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 1:
        rows = keep.view(-1).nonzero().view(-1)
        bags = max(1, min(_BAGS, rows.numel() // 64))  # fixed by the shape, not the threads: same sums at any count
        offsets = _ZERO if bags == 1 else torch.arange(bags) * (rows.numel() // bags)
        y = F.embedding_bag(rows, weight_t, offsets, mode="sum", per_sample_weights=x.view(-1)[rows])
        return y if bags == 1 else y.sum(dim=0, keepdim=True)
    rows = keep.any(dim=0).nonzero().view(-1)
    return torch.where(keep, x, 0).index_select(1, rows) @ weight_t.index_select(0, rows)


_ZERO = torch.zeros(1, dtype=torch.long)
_BAGS = 8
"""Bags of one token's kept rows (summed in order at the end); threads share the bags."""


def masked_rows_matmul(
    x: torch.Tensor, keep: torch.Tensor, weight_t: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`(x·keep) @ weight_t` for x, keep [B, K], reading only rows of `weight_t` [K, N] some token keeps.

    Written into `out` [B, N] when given (every entry is overwritten).
    """
    if x.dim() != 2 or weight_t.dim() != 2 or x.shape[1] != weight_t.shape[0] or keep.shape != x.shape:
        raise ValueError(f"shapes {tuple(x.shape)} (keep {tuple(keep.shape)}) @ {tuple(weight_t.shape)} do not match")
    if x.dtype != weight_t.dtype:
        raise ValueError(f"dtypes differ: {x.dtype} and {weight_t.dtype}")
    y = None
    if x.is_cuda:
        from actsparse.speed.kernels import sparse_ffn_triton

        if sparse_ffn_triton.available() and x.shape[0] <= sparse_ffn_triton.MAX_BATCH:
            y = sparse_ffn_triton.sparse_rows_matmul(torch.where(keep, x, 0), weight_t, out=out)  # faster than keep=
    if y is None:
        y = _cpu_rows_matmul(x, keep, weight_t)
    return y if out is None else out.copy_(y)


def masked_rows_matmul_reference(x: torch.Tensor, keep: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """`(x·keep) @ weight_t` computed densely: what every fast path must equal."""
    return torch.where(keep, x, 0) @ weight_t


def _and(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a & b


def _masked(v: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    return v if keep is None else torch.where(keep, v, 0)


def sparse_ffn(x: torch.Tensor, weights: SparseFFNWeights, keep: Masker) -> torch.Tensor:
    """FFN of decode tokens x [B, h], skipping the weight rows of the entries `keep` drops."""
    dense = weights.dense
    keep_x = keep("input", x)
    if weights.gate_t is not None and weights.up_t is not None and keep_x is not None:
        gate, up = masked_rows_matmul(x, keep_x, weights.gate_t), masked_rows_matmul(x, keep_x, weights.up_t)
        if dense.gate_bias is not None:
            gate = gate + dense.gate_bias
        if dense.up_bias is not None:
            up = up + dense.up_bias
    else:
        x = _masked(x, keep_x)
        gate, up = F.linear(x, dense.gate, dense.gate_bias), F.linear(x, dense.up, dense.up_bias)
    g = dense.act(gate)
    keep_i = _and(keep("gate", g), keep("up", up))
    i = g * up
    keep_i = _and(keep_i, keep("intermediate", _masked(i, keep_i)))
    if weights.down_t is None or keep_i is None:
        return F.linear(_masked(i, keep_i), dense.down, dense.down_bias)
    y = masked_rows_matmul(i, keep_i, weights.down_t)
    return y if dense.down_bias is None else y + dense.down_bias


def sparse_ffn_reference(x: torch.Tensor, weights: GatedWeights, keep: Masker) -> torch.Tensor:
    """The same FFN with dense products on the masked vectors (the `sparsify()` simulation)."""
    x = _masked(x, keep("input", x))
    g = weights.act(F.linear(x, weights.gate, weights.gate_bias))
    u = F.linear(x, weights.up, weights.up_bias)
    g, u = _masked(g, keep("gate", g)), _masked(u, keep("up", u))
    i = g * u
    return F.linear(_masked(i, keep("intermediate", i)), weights.down, weights.down_bias)
