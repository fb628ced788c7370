"""Triton sparse GEMV for CUDA decode (bf16/fp16/fp32), batch 1 to `MAX_BATCH` with a union mask.

`y = (x·keep) @ w_t` with w_t [K, N] laid out so that input entry k owns the contiguous row k. A
program owns BLOCK_N outputs and a slice of K (split-K); for each BLOCK_K block it loads x (and the
keep-mask, when given) for every token, and loads only the weight rows some token needs (a masked
load, so a skipped row costs no memory traffic). No index compaction, hence no device-host sync.
(Measured on an H200: accumulating a [B, BLOCK_K, BLOCK_N] block and reducing once after the loop
was slower, and so was applying the keep-mask inside the kernel rather than zeroing x before it.)

One launch does everything: with split-K, each program writes its float32 partial sums to a scratch
buffer and takes a ticket from a per-column-block counter; the last program of a column block adds
the partials in a fixed order, writes y in its dtype and resets the counter to zero, so the counters
are clean for the next launch (scratch and counters are kept per device; launches on one stream at a
time, as in decode). The sum order is fixed, so results do not depend on scheduling. Checked against
`x @ w_t` on CPU tensors under TRITON_INTERPRET=1; launch settings compared by `benchmarks/gemv_configs.py`.
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

__all__ = ["MAX_BATCH", "GemvConfig", "available", "default_config", "launches", "sparse_rows_matmul"]

MAX_BATCH = 8
"""Largest number of tokens the kernel serves; the union of their masks decides the rows read."""


def available() -> bool:
    """Whether the triton package is importable."""
    return triton is not None


_LAUNCHES = [0]


def launches() -> int:
    """Launches of the sparse GEMV from Python in this process (a captured graph's replays not counted)."""
    return _LAUNCHES[0]


if triton is not None:

    @triton.jit
    def _sparse_rows_gemv(
        x_ptr,
        keep_ptr,
        w_ptr,
        y_ptr,
        partial_ptr,
        ticket_ptr,
        batch,
        k_size,
        n_size,
        stride_x,
        stride_keep,
        stride_w,
        stride_y,
        k_per_program,
        split_k,
        HAS_KEEP: tl.constexpr,
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
        out_ok = b_ok[:, None] & n_ok[None, :]
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        k_start = pid_k * k_per_program
        for k0 in range(k_start, k_start + k_per_program, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_size
            x_ok = b_ok[:, None] & k_ok[None, :]
            x = tl.load(x_ptr + offs_b[:, None] * stride_x + offs_k[None, :], mask=x_ok, other=0.0).to(tl.float32)
            if HAS_KEEP:
                kept = tl.load(keep_ptr + offs_b[:, None] * stride_keep + offs_k[None, :], mask=x_ok, other=0)
                x = tl.where(kept != 0, x, 0.0)
            needed = (tl.max(tl.abs(x), axis=0) > 0) & k_ok
            w = tl.load(
                w_ptr + offs_k[:, None] * stride_w + offs_n[None, :], mask=needed[:, None] & n_ok[None, :], other=0.0
            ).to(tl.float32)
            acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
        y_ptrs = y_ptr + offs_b[:, None] * stride_y + offs_n[None, :]
        if split_k == 1:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
        else:
            part = partial_ptr + offs_b[:, None] * n_size + offs_n[None, :]
            tl.store(part + pid_k * BLOCK_B * n_size, acc, mask=out_ok)
            tl.debug_barrier()  # every thread's partial is written before the ticket is taken
            ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
            if ticket == split_k - 1:  # the last program of this column block: sum in a fixed order
                total = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
                for s in range(0, split_k):
                    total += tl.load(part + s * BLOCK_B * n_size, mask=out_ok, other=0.0, cache_modifier=".cg")
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_ok)
                tl.atomic_xchg(ticket_ptr + pid_n, 0, sem="relaxed", scope="gpu")


class GemvConfig(NamedTuple):
    """Launch settings: rows of K and columns of N per block, programs per multiprocessor, warps, pipeline stages."""

    block_k: int
    block_n: int
    programs_per_sm: int = 8
    num_warps: int = 4
    num_stages: int = 3


def default_config(batch: int) -> GemvConfig:
    """The launch settings used unless a caller passes others (the best of `benchmarks/gemv_configs.py`
    on an H200 at batch 1, 50 % sparsity)."""
    return GemvConfig(16, 256, 8, 4) if batch <= 2 else GemvConfig(8, 128, 8, 4)


@functools.cache
def _processors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _split(config: GemvConfig, k_size: int, n_size: int, processors: int) -> tuple[int, int]:
    """(K per program, programs along K): `programs_per_sm` per multiprocessor, at least 8 blocks of K each."""
    programs_n = triton.cdiv(n_size, config.block_n)
    target = triton.cdiv(config.programs_per_sm * processors, programs_n)
    split_k = max(1, min(triton.cdiv(k_size, 8 * config.block_k), target))
    k_per_program = triton.cdiv(triton.cdiv(k_size, split_k), config.block_k) * config.block_k
    return k_per_program, triton.cdiv(k_size, k_per_program)


_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[torch.Tensor] = []
"""Outgrown scratch buffers, kept alive: a captured CUDA graph may still point at them."""


def _scratch(device: torch.device, partial_floats: int, tickets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 partials and zeroed int32 tickets of at least these sizes, kept per device, doubled on demand."""
    partial, ticket = _SCRATCH.get(device, (None, None))
    if partial is None or ticket is None or partial.numel() < partial_floats or ticket.numel() < tickets:
        if partial is not None and ticket is not None:
            _RETIRED.extend((partial, ticket))
        floats = max(partial_floats, 0 if partial is None else 2 * partial.numel())
        count = max(tickets, 0 if ticket is None else 2 * ticket.numel())
        partial = torch.empty(floats, dtype=torch.float32, device=device)
        ticket = torch.zeros(count, dtype=torch.int32, device=device)
        _SCRATCH[device] = (partial, ticket)
    return partial, ticket


def sparse_rows_matmul(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """`(x·keep) @ weight_t` for x [B ≤ MAX_BATCH, K] reading only the rows of `weight_t` [K, N] in use.

    `keep` [B, K] (bool) zeroes entries of x inside the kernel; without it, x's zeros are skipped.
    Written into `out` [B, N] (x's dtype, contiguous) when given; every entry is overwritten.
    """
    if triton is None:
        raise RuntimeError("the triton package is not installed")
    batch, k_size = x.shape
    n_size = weight_t.shape[1]
    if batch > MAX_BATCH:
        raise ValueError(f"batch {batch} exceeds MAX_BATCH={MAX_BATCH}")
    x = x.contiguous()
    weight_t = weight_t if weight_t.stride(1) == 1 else weight_t.contiguous()  # any row stride
    y = out if out is not None and out.is_contiguous() else torch.empty(batch, n_size, dtype=x.dtype, device=x.device)
    config = config or default_config(batch)
    block_b = max(1, triton.next_power_of_2(batch))
    k_per_program, split_k = _split(config, k_size, n_size, _processors(x.device))
    programs_n = triton.cdiv(n_size, config.block_n)
    partial, ticket = _scratch(x.device, split_k * block_b * n_size if split_k > 1 else 1, programs_n)
    if keep is not None:
        keep = keep.contiguous().view(torch.uint8) if keep.dtype == torch.bool else keep.contiguous()
    _LAUNCHES[0] += 1
    _sparse_rows_gemv[(programs_n, split_k)](
        x,
        x if keep is None else keep,
        weight_t,
        y,
        partial,
        ticket,
        batch,
        k_size,
        n_size,
        x.stride(0),
        0 if keep is None else keep.stride(0),
        weight_t.stride(0),
        y.stride(0),
        k_per_program,
        split_k,
        HAS_KEEP=keep is not None,
        BLOCK_B=block_b,
        BLOCK_K=config.block_k,
        BLOCK_N=config.block_n,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return y if out is None or y is out else out.copy_(y)  # a non-contiguous `out` is filled from y
