"""Triton sparse GEMV for CUDA decode (bf16/fp16/fp32), batch 1 to `MAX_BATCH` with a union mask.

`y = x @ w_t` with w_t [K, N] laid out so that input entry k owns the contiguous row k. A program
owns BLOCK_N outputs and a slice of K (split-K, summed with fp32 atomics); for each BLOCK_K block it
loads x for every token, and loads only the weight rows that some token needs (a masked load, so a
skipped row costs no memory traffic). No index compaction, hence no device-host sync. Checked
against `x @ w_t` on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

__all__ = ["MAX_BATCH", "available", "sparse_rows_matmul"]

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


def _config(batch: int, k_size: int, n_size: int, processors: int) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_N, K per program): about four programs per streaming multiprocessor."""
    block_n = 128 if batch <= 2 else 64
    block_k = 16 if batch <= 2 else 8
    programs_n = triton.cdiv(n_size, block_n)
    split_k = max(1, min(triton.cdiv(k_size, 8 * block_k), triton.cdiv(4 * processors, programs_n)))
    k_per_program = triton.cdiv(triton.cdiv(k_size, split_k), block_k) * block_k
    return block_k, block_n, k_per_program


def sparse_rows_matmul(x: torch.Tensor, weight_t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
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
    y = torch.zeros(batch, n_size, dtype=torch.float32, device=x.device)
    processors = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    block_k, block_n, k_per_program = _config(batch, k_size, n_size, processors)
    grid = (triton.cdiv(n_size, block_n), triton.cdiv(k_size, k_per_program))
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
        BLOCK_K=block_k,
        BLOCK_N=block_n,
    )
    return y.to(x.dtype) if out is None else out.copy_(y)
