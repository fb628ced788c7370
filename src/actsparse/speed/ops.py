"""The sparse FFN decode as `torch.library` custom ops: a rule's keep-mask and the product that reads only the
weight rows of kept entries, each one node that `torch.compile` traces through (a fake implementation gives
its output's shape) instead of a graph break at Python it cannot follow (`nonzero`, the C and Triton kernels).

`keep_mask` is the rule of `sparsity.rules` (the one definition; it raises on NaN or Inf). On CUDA the op runs
`graph_safe_mask` instead: the same keep-masks for threshold, top_k and max_p with no read-back to the host,
so that a CUDA graph can capture the step (no NaN check there: a timing loop). `masked_rows_matmul` is
`kernels.sparse_ffn.masked_rows_matmul` (embedding-bag rows on CPU, the Triton kernel on CUDA).
"""

from __future__ import annotations

import torch

from actsparse.sparsity.rules import RULES
from actsparse.speed.kernels import sparse_ffn

__all__ = ["GRAPH_SAFE_RULES", "graph_safe_mask", "keep_mask", "masked_rows_matmul"]

GRAPH_SAFE_RULES = ("threshold", "top_k", "max_p")
"""Rules whose mask needs no value read back to the host (top_p's sort-free kernel reads its NaN flag back)."""


def graph_safe_mask(v: torch.Tensor, rule: str, value: float) -> torch.Tensor:
    """The keep-mask of `rule` on v (as `sparsity.rules`), in tensor ops only: nothing waits for the device."""
    a = v.abs()
    if rule == "threshold":
        return a.double() > value
    if rule == "top_k":
        k = max(1, int(v.shape[-1] * value))
        return a >= a.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    if rule == "max_p":
        return a.double() >= value * a.amax(dim=-1, keepdim=True).double()
    raise ValueError(f"rule {rule!r} reads values back to the host; graph-safe rules: {', '.join(GRAPH_SAFE_RULES)}")


@torch.library.custom_op("actsparse::keep_mask", mutates_args=())
def keep_mask(v: torch.Tensor, rule: str, value: float) -> torch.Tensor:
    """The keep-mask of `rule` with `value` on v along its last dimension (bool, v's shape)."""
    return RULES[rule](v, value)


@keep_mask.register_kernel("cuda")
def _keep_mask_cuda(v: torch.Tensor, rule: str, value: float) -> torch.Tensor:
    return graph_safe_mask(v, rule, value)


@keep_mask.register_fake
def _keep_mask_fake(v: torch.Tensor, rule: str, value: float) -> torch.Tensor:
    return torch.empty_like(v, dtype=torch.bool)


@torch.library.custom_op("actsparse::masked_rows_matmul", mutates_args=())
def masked_rows_matmul(x: torch.Tensor, keep: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """`(x·keep) @ weight_t` for x, keep [B, K] and weight_t [K, N], reading only the rows of kept entries."""
    return sparse_ffn.masked_rows_matmul(x, keep, weight_t)


@masked_rows_matmul.register_fake
def _masked_rows_matmul_fake(x: torch.Tensor, keep: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight_t.shape[1]))
