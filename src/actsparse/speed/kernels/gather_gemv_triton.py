"""Triton two-stage sparse GEMV: compact the kept rows on the device, then a GEMV over them only.

`y = (x·keep) @ w_t` for x [B ≤ 8, K] (bf16, fp16 or fp32) and w_t [K, N] with contiguous rows. The masked
load of `sparse_ffn_triton` still walks every block of K and is latency-bound; here the time falls with the
kept rows. Stage 1 (`_compact`, one program): the union of the tokens' masks (keep, or x ≠ 0) as a list of
row indices, in index order, and its length, written to device memory. Stage 2 (`_gather_gemv`): each
program owns BLOCK_N columns and a slice of the list (split-K, sized from the length it reads on the device:
no host sync, so it can be captured in a CUDA graph) and writes float32 partial sums; stage 3 (`_reduce`)
adds them in a fixed order and casts. Launch settings come from `GATHER_TABLE` by shape and
sparsity band (the expected kept fraction, given by the caller; unmeasured defaults until
`benchmarks/gemv_configs.py --gather` has run on a GPU). Checked under TRITON_INTERPRET=1 on CPU tensors.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

__all__ = ["GATHER_TABLE", "MAX_BATCH", "GatherConfig", "available", "gather_config", "gather_rows_matmul"]

MAX_BATCH = 8


class GatherConfig(NamedTuple):
    """Launch settings: kept rows per step, columns per program, programs per multiprocessor, warps."""

    block_k: int
    block_n: int
    programs_per_sm: int = 4
    num_warps: int = 4


GATHER_TABLE: dict[tuple[str, str], GatherConfig] = {
    ("small", "dense"): GatherConfig(32, 128, 4, 4),
    ("small", "sparse"): GatherConfig(16, 128, 4, 4),
    ("large", "dense"): GatherConfig(32, 256, 4, 4),
    ("large", "sparse"): GatherConfig(16, 256, 8, 4),
}
"""(shape band: K·N below or above 2²⁴, sparsity band: kept fraction above or below 0.6) → settings."""


def gather_config(k_size: int, n_size: int, kept_fraction: float) -> GatherConfig:
    """The table's launch settings for a K × N weight at this expected kept fraction."""
    shape = "small" if k_size * n_size < 2**24 else "large"
    return GATHER_TABLE[shape, "dense" if kept_fraction > 0.6 else "sparse"]


def available() -> bool:
    """Whether the triton package is importable."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _compact(
        x_ptr, keep_ptr, idx_ptr, count_ptr, batch, k_size, stride_x, stride_keep, HAS_KEEP: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offs_b = tl.arange(0, BLOCK_B)
        b_ok = offs_b < batch
        total = 0
        for k0 in range(0, k_size, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            ok = b_ok[:, None] & (offs < k_size)[None, :]
            if HAS_KEEP:
                kept = tl.load(keep_ptr + offs_b[:, None] * stride_keep + offs[None, :], mask=ok, other=0) != 0
            else:
                kept = tl.load(x_ptr + offs_b[:, None] * stride_x + offs[None, :], mask=ok, other=0.0) != 0
            any_kept = tl.max(kept.to(tl.int32), axis=0)
            position = total + tl.cumsum(any_kept, axis=0) - 1
            tl.store(idx_ptr + position, offs, mask=any_kept != 0)
            total += tl.sum(any_kept, axis=0)
        tl.store(count_ptr, total)

    @triton.jit
    def _gather_gemv(
        x_ptr, keep_ptr, w_ptr, idx_ptr, count_ptr, partial_ptr, batch, n_size, stride_x, stride_keep, stride_w,
        split_k, HAS_KEEP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        count = tl.load(count_ptr)
        per_program = tl.cdiv(tl.cdiv(count, split_k), BLOCK_K) * BLOCK_K
        start = pid_k * per_program
        end = tl.minimum(start + per_program, count)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        n_ok = offs_n < n_size
        b_ok = offs_b < batch
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_K):
            offs_r = r0 + tl.arange(0, BLOCK_K)
            r_ok = offs_r < end
            rows = tl.load(idx_ptr + offs_r, mask=r_ok, other=0)
            x_ok = b_ok[:, None] & r_ok[None, :]
            x = tl.load(x_ptr + offs_b[:, None] * stride_x + rows[None, :], mask=x_ok, other=0.0).to(tl.float32)
            if HAS_KEEP:
                kept = tl.load(keep_ptr + offs_b[:, None] * stride_keep + rows[None, :], mask=x_ok, other=0)
                x = tl.where(kept != 0, x, 0.0)
            w = tl.load(
                w_ptr + rows[:, None].to(tl.int64) * stride_w + offs_n[None, :],
                mask=r_ok[:, None] & n_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
        part = partial_ptr + pid_k * BLOCK_B * n_size + offs_b[:, None] * n_size + offs_n[None, :]
        tl.store(part, acc, mask=b_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _reduce(partial_ptr, y_ptr, batch, n_size, stride_y, split_k, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_n = tl.program_id(0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        ok = (offs_b < batch)[:, None] & (offs_n < n_size)[None, :]
        total = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for s in range(0, split_k):  # a fixed order: the same bits at every launch
            total += tl.load(partial_ptr + s * BLOCK_B * n_size + offs_b[:, None] * n_size + offs_n[None, :], mask=ok)
        tl.store(y_ptr + offs_b[:, None] * stride_y + offs_n[None, :], total.to(y_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def gather_rows_matmul(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    keep: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    kept_fraction: float = 0.5,
    config: GatherConfig | None = None,
) -> torch.Tensor:
    """`(x·keep) @ weight_t` for x [B ≤ MAX_BATCH, K], reading only the rows of `weight_t` [K, N] some token keeps.

    Without `keep`, x's zeros are skipped. `kept_fraction` (the expected one) picks the launch settings and
    the split along K; the real count is read on the device. Written into `out` [B, N] when given.
    """
    if triton is None:
        raise RuntimeError("the triton package is not installed")
    batch, k_size = x.shape
    n_size = weight_t.shape[1]
    if batch > MAX_BATCH or weight_t.shape[0] != k_size:
        raise ValueError(f"x {tuple(x.shape)} @ {tuple(weight_t.shape)}: shapes do not match or batch > {MAX_BATCH}")
    x = x.contiguous()
    weight_t = weight_t if weight_t.stride(1) == 1 else weight_t.contiguous()
    y = out if out is not None and out.is_contiguous() else torch.empty(batch, n_size, dtype=x.dtype, device=x.device)
    config = config or gather_config(k_size, n_size, kept_fraction)
    block_b = max(1, triton.next_power_of_2(batch))
    if keep is not None:
        keep = keep.contiguous().view(torch.uint8) if keep.dtype == torch.bool else keep.contiguous()
    idx = torch.empty(k_size, dtype=torch.int32, device=x.device)
    count = torch.empty(1, dtype=torch.int32, device=x.device)
    has_keep = keep is not None
    keep_arg = x if keep is None else keep
    stride_keep = 0 if keep is None else keep.stride(0)
    _compact[(1,)](x, keep_arg, idx, count, batch, k_size, x.stride(0), stride_keep, has_keep, block_b, 1024)
    programs_n = triton.cdiv(n_size, config.block_n)
    expected = max(1, int(k_size * kept_fraction))
    target = triton.cdiv(config.programs_per_sm * _processors(x.device), programs_n)
    split_k = max(1, min(triton.cdiv(expected, 4 * config.block_k), target))
    partial = torch.empty(split_k * block_b * n_size, dtype=torch.float32, device=x.device)
    _gather_gemv[(programs_n, split_k)](
        x, keep_arg, weight_t, idx, count, partial, batch, n_size, x.stride(0), stride_keep, weight_t.stride(0),
        split_k, has_keep, block_b, config.block_k, config.block_n, num_warps=config.num_warps,
    )  # fmt: skip
    _reduce[(programs_n,)](partial, y, batch, n_size, y.stride(0), split_k, block_b, config.block_n)
    return y
