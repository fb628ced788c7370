"""Triton top-p kernel for CUDA, behind the `torch.library` custom op `actsparse::top_p_mask` (see `topp`).

One program holds ROWS rows on chip as bit patterns of |v| and finds τ bit by bit: the largest pattern
whose mass at or above it reaches p·total (31 masked sums, float32 over groups of 64 then float64;
a sum within the float32 error of the target is redone in float64 the way the total was), then writes
|v| ≥ τ; p = 1 keeps every nonzero entry. The custom op `actsparse::top_p_mask` (in `topp`) runs it on CUDA,
and the CPU / PyTorch path of `topp` elsewhere. Under
`TRITON_INTERPRET=1` the kernel also runs on CPU tensors, which is how the tests check it.
"""

from __future__ import annotations

import os

import torch

from actsparse.speed.kernels._common import raise_non_finite

__all__ = ["available", "top_p_mask_triton"]

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None


def available() -> bool:
    """Whether the Triton kernel can run here (triton imports and a GPU, or the interpreter, is present)."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _mass64(
        x_ptr, start, local_rows, row_ok, n, candidate, ROWS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr
    ):
        """Float64 sum of the |x| with bit pattern ≥ candidate, per row: CHUNK-wide tree sums, added in order.

        Reloads the rows (they are hot in L1/L2) rather than keep a float64 copy in registers.
        """
        mass = tl.zeros([ROWS], dtype=tl.float64)
        for c0 in range(0, BLOCK, CHUNK):
            col = c0 + tl.arange(0, CHUNK)
            ok = row_ok[:, None] & (col[None, :] < n)
            x = tl.load(x_ptr + start + local_rows[:, None] * n + col[None, :], mask=ok, other=0.0)
            a = tl.abs(x.to(tl.float32))
            kept = a.to(tl.int32, bitcast=True) >= candidate[:, None]
            mass += tl.sum(tl.where(kept, a.to(tl.float64), 0.0), axis=1)
        return mass

    @triton.jit
    def _top_p_mask_kernel(
        x_ptr,
        p_ptr,
        keep_ptr,
        bad_ptr,
        rows,
        n,
        ROWS: tl.constexpr,
        GROUPS: tl.constexpr,
        GROUP: tl.constexpr,
        CHUNK: tl.constexpr,
    ):
        # rows held on chip as [ROWS, GROUPS, GROUP] bit patterns of |x|; the float32 view is the same registers
        first = tl.program_id(0) * ROWS
        local_rows = tl.arange(0, ROWS)
        r = first + local_rows
        row_ok = r < rows
        start = first.to(tl.int64) * n
        col = tl.arange(0, GROUPS)[None, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]
        offsets = local_rows[:, None, None] * n + col
        inside = row_ok[:, None, None] & (col < n)
        x = tl.load(x_ptr + start + offsets, mask=inside, other=0.0)
        key = tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True)
        a = key.to(tl.float32, bitcast=True)
        zero = tl.zeros([ROWS], dtype=tl.int32)
        total = _mass64(x_ptr, start, local_rows, row_ok, n, zero, ROWS, GROUPS * GROUP, CHUNK)
        target = tl.load(p_ptr) * total
        # |float32-by-group sum - float64 sum| ≤ GROUP·2⁻²⁴·total (+ float64 rounding): 2⁻¹⁷ leaves room
        slack = total * 7.62939453125e-06
        top = tl.max(tl.max(key, axis=2), axis=1)
        tau = zero
        for bit in range(30, -1, -1):
            candidate = tau | (1 << bit)
            kept = key >= candidate[:, None, None]
            mass = tl.sum(tl.sum(tl.where(kept, a, 0.0), axis=2).to(tl.float64), axis=1)
            close = (tl.abs(mass - target) <= slack) & (target > 0)
            if tl.max(close.to(tl.int32), axis=0) > 0:
                mass = _mass64(x_ptr, start, local_rows, row_ok, n, candidate, ROWS, GROUPS * GROUP, CHUNK)
            tau = tl.where(mass >= target, candidate, tau)
        tau = tl.where(target > 0, tau, top)
        # p = 1: every nonzero entry (SPEC §2), which the float64 sums cannot tell for a tiny one beside a huge one
        smallest = tl.min(tl.min(tl.where(key > 0, key, 0x7F800000), axis=2), axis=1)
        tau = tl.where((target >= total) & (top > 0), smallest, tau)  # target ≥ total exactly when p = 1
        tl.store(keep_ptr + start + offsets, key >= tau[:, None, None], mask=inside)
        tl.store(bad_ptr + r, top >= 0x7F800000, mask=row_ok)


def top_p_mask_triton(v: torch.Tensor, p: float) -> torch.Tensor:
    """Exact top-p keep-mask by the Triton kernel (CUDA tensors, or CPU tensors under the interpreter).

    Waits for the GPU once per call: it reads the kernel's NaN/Inf flag back to raise at once.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    n = v.shape[-1]
    x = v.detach().reshape(v.shape[:-1].numel(), n).contiguous()
    rows = x.shape[0]
    keep = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    bad = torch.zeros(rows, dtype=torch.bool, device=x.device)
    if x.numel():
        block = triton.next_power_of_2(n)
        group = min(64, block)
        per_program = max(1, min(16, 2048 // block))
        warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
        p_t = torch.full((1,), p, dtype=torch.float64, device=x.device)
        grid = (triton.cdiv(rows, per_program),)
        chunk = min(block, 2048 // per_program)
        _top_p_mask_kernel[grid](
            x,
            p_t,
            keep,
            bad,
            rows,
            n,
            ROWS=per_program,
            GROUPS=block // group,
            GROUP=group,
            CHUNK=chunk,
            num_warps=warps,
        )
        if bool(bad.any()):
            raise_non_finite()
    return keep.reshape(v.shape)
