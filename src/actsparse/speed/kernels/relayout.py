"""Re-lay 2-D weights out in place: the storage of w [out, in] holds wᵀ row by row while a block runs.

The sparse decode kernels read one row per kept input entry, so they want wᵀ [in, out] with contiguous
rows. Instead of a transposed copy beside the weights (twice the memory), `transposed_in_place` permutes
each parameter's own storage and gives the parameter a view with its old shape and transposed strides
(`w.t()` of that storage), which every dense code path (F.linear, slicing) accepts unchanged; on exit
the storage is permuted back and the parameter gets its old strides: the same bits at the same address.
One buffer, the size of the largest matrix, serves every permutation of a block and is unmapped after it.
On CPU it is an anonymous memory map, not malloc's: freeing a malloc'd block that large raises glibc's
dynamic mmap threshold, after which the model's own temporaries pile up in the heap (+9 % peak RSS in a
SmolLM2 decode, measured by `benchmarks/accelerate_memory.py`; 0.3 % with the map).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress

import torch

__all__ = ["transposed_in_place"]


def _flat(t: torch.Tensor) -> torch.Tensor:
    """All of t's elements as one contiguous run of its own storage."""
    return torch.as_strided(t, (t.numel(),), (1,), t.storage_offset())


def _scratch(buffer: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The first p.numel() elements of `buffer` (bytes), as p's dtype."""
    return buffer[: p.numel() * p.element_size()].view(p.dtype)


def _transpose_storage(p: torch.Tensor, buffer: torch.Tensor) -> None:
    """p [out, in] (contiguous) → its storage holds pᵀ row-major; p keeps its shape with strides (1, out)."""
    out_f, in_f = p.shape
    with torch.no_grad():
        flat, tmp = _flat(p.data), _scratch(buffer, p)
        tmp.view(in_f, out_f).copy_(p.data.t())
        flat.copy_(tmp)
        p.data = flat.view(in_f, out_f).t()


def _restore_storage(p: torch.Tensor, buffer: torch.Tensor) -> None:
    """Undo `_transpose_storage`: contiguous [out, in] again, in the same storage."""
    out_f, in_f = p.shape
    with torch.no_grad():
        flat, tmp = _flat(p.data), _scratch(buffer, p)
        tmp.view(out_f, in_f).copy_(p.data)
        flat.copy_(tmp)
        p.data = flat.view(out_f, in_f)


@contextmanager
def _buffer(params: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Bytes enough for the largest of `params` (on the device of the first: one call re-lays out one FFN)."""
    size = max(p.numel() * p.element_size() for p in params)
    if params[0].device.type != "cpu":
        yield torch.empty(size, dtype=torch.uint8, device=params[0].device)
        return
    region = mmap.mmap(-1, size)
    try:
        yield torch.frombuffer(region, dtype=torch.uint8)
    finally:
        with suppress(BufferError):  # a view of it still alive somewhere: the collector unmaps it
            region.close()


def _relaid(p: torch.Tensor) -> bool:
    return p.dim() == 2 and p.stride() == (1, p.shape[0]) and p.shape[0] > 1


@contextmanager
def transposed_in_place(params: Iterable[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """While the block runs, each 2-D contiguous parameter's storage holds its transpose (see above).

    Yields the parameters re-laid out (each once; others, e.g. already strided ones, are left alone);
    always restores them, bitwise, on exit.
    """
    todo: list[torch.Tensor] = []
    for p in params:
        if all(p is not q for q in todo) and p.dim() == 2 and p.is_contiguous() and min(p.shape) >= 2:
            todo.append(p)
    done: list[torch.Tensor] = []
    try:
        if todo:
            with _buffer(todo) as buffer:
                for p in todo:
                    _transpose_storage(p, buffer)
                    done.append(p)
                del buffer
        yield done
    finally:
        back = [p for p in reversed(done) if _relaid(p)]  # unless replaced inside the block
        if back:
            with _buffer(back) as buffer:
                for p in back:
                    _restore_storage(p, buffer)
                del buffer
