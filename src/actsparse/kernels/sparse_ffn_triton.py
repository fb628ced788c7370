"""Triton sparse GEMV for CUDA decode (bf16/fp16/fp32), batch 1 to `MAX_BATCH` with a union mask.

`y = x @ w_t` with w_t [K, N] laid out so that input entry k owns the contiguous row k. A program
owns BLOCK_N outputs and a slice of K (split-K, summed with fp32 atomics); for each BLOCK_K block it
loads x for every token, and loads only the weight rows that some token needs (a masked load, so a
skipped row costs no memory traffic). No index compaction, hence no device-host sync. Checked
against `x @ w_t` on CPU tensors under TRITON_INTERPRET=1.
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

__all__ = ["MAX_BATCH", "GemvConfig", "available", "default_config", "sparse_rows_matmul"]

MAX_BATCH = 8
"""Largest number of tokens the kernel serves; the union of their masks decides the rows read."""


def available() -> bool:
    """Whether the triton package is importable."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _sparse_rows_gemv(
        x_ptr,
        w_ptr,
        y_ptr,
        batch,
        k_size,
        n_size,
        stride_x,
        stride_w,
        stride_y,
        k_per_program,
        BLOCK_B: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_b = tl.arange(0, BLOCK_B)
        n_ok = offs_n < n_size
        b_ok = offs_b < batch
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * k_per_program
        for k0 in range(k_start, k_start + k_per_program, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_size
            x = tl.load(
                x_ptr + offs_b[:, None] * stride_x + offs_k[None, :], mask=b_ok[:, None] & k_ok[None, :], other=0.0
            ).to(tl.float32)
            needed = (tl.max(tl.abs(x), axis=0) > 0) & k_ok
            w = tl.load(
                w_ptr + offs_k[:, None] * stride_w + offs_n[None, :], mask=needed[:, None] & n_ok[None, :], other=0.0
            ).to(tl.float32)
            acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
        tl.atomic_add(y_ptr + offs_b[:, None] * stride_y + offs_n[None, :], acc, mask=b_ok[:, None] & n_ok[None, :])


class GemvConfig(NamedTuple):
    """Launch settings: rows of K and columns of N per block, programs per multiprocessor, warps."""

    block_k: int
    block_n: int
    programs_per_sm: int = 4
    num_warps: int = 4


def default_config(batch: int) -> GemvConfig:
    """The launch settings used unless a caller passes others (`benchmarks/gemv_configs.py` compares them)."""
    return GemvConfig(16, 128) if batch <= 2 else GemvConfig(8, 64)


@functools.cache
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _split(config: GemvConfig, k_size: int, n_size: int, processors: int) -> int:
    """K per program: enough programs for `programs_per_sm` per multiprocessor, at least 8 blocks of K each."""
    programs_n = triton.cdiv(n_size, config.block_n)
    target = triton.cdiv(config.programs_per_sm * processors, programs_n)
    split_k = max(1, min(triton.cdiv(k_size, 8 * config.block_k), target))
    return triton.cdiv(triton.cdiv(k_size, split_k), config.block_k) * config.block_k


def sparse_rows_matmul(
    x: torch.Tensor, weight_t: torch.Tensor, out: torch.Tensor | None = None, config: GemvConfig | None = None
) -> torch.Tensor:
    """`x @ weight_t` for x [B ≤ MAX_BATCH, K] reading only the rows of `weight_t` [K, N] in use.

    Written into `out` [B, N] (x's dtype) when given; every entry is overwritten.
    """
    if triton is None:
        raise RuntimeError("the triton package is not installed")
    batch, k_size = x.shape
    n_size = weight_t.shape[1]
    if batch > MAX_BATCH:
        raise ValueError(f"batch {batch} exceeds MAX_BATCH={MAX_BATCH}")
    x = x.contiguous()
    weight_t = weight_t.contiguous()
    config = config or default_config(batch)
    y = torch.zeros(batch, n_size, dtype=torch.float32, device=x.device)
    k_per_program = _split(config, k_size, n_size, _processors(x.device))
    grid = (triton.cdiv(n_size, config.block_n), triton.cdiv(k_size, k_per_program))
    _sparse_rows_gemv[grid](
        x,
        weight_t,
        y,
        batch,
        k_size,
        n_size,
        x.stride(0),
        weight_t.stride(0),
        y.stride(0),
        k_per_program,
        BLOCK_B=max(1, triton.next_power_of_2(batch)),
        BLOCK_K=config.block_k,
        BLOCK_N=config.block_n,
        num_warps=config.num_warps,
    )
    return y.to(x.dtype) if out is None else out.copy_(y)
