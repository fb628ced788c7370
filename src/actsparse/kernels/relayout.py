"""Re-lay 2-D weights out in place: the storage of w [out, in] holds wᵀ row by row while a block runs.

The sparse decode kernels read one row per kept input entry, so they want wᵀ [in, out] with contiguous
rows. Instead of a transposed copy beside the weights (twice the memory), `transposed_in_place` permutes
each parameter's own storage and gives the parameter a view with its old shape and transposed strides
(`w.t()` of that storage), which every dense code path (F.linear, slicing) accepts unchanged; on exit
the storage is permuted back and the parameter gets its old strides: the same bits at the same address.
One matrix-sized buffer is alive at a time, during the permutation only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["transposed_in_place"]


def _flat(t: torch.Tensor) -> torch.Tensor:
    """All of t's elements as one contiguous run of its own storage."""
    return torch.as_strided(t, (t.numel(),), (1,), t.storage_offset())


def _transpose_storage(p: torch.Tensor) -> None:
    """p [out, in] (contiguous) → its storage holds pᵀ row-major; p keeps its shape with strides (1, out)."""
    out_f, in_f = p.shape
    with torch.no_grad():
        flat = _flat(p.data)
        flat.copy_(p.data.t().contiguous().view(-1))  # the only buffer: one matrix, freed here
        p.data = flat.view(in_f, out_f).t()


def _restore_storage(p: torch.Tensor) -> None:
    """Undo `_transpose_storage`: contiguous [out, in] again, in the same storage."""
    out_f, in_f = p.shape
    with torch.no_grad():
        flat = _flat(p.data)
        flat.copy_(p.data.contiguous().view(-1))
        p.data = flat.view(out_f, in_f)


def _relaid(p: torch.Tensor) -> bool:
    return p.dim() == 2 and p.stride() == (1, p.shape[0]) and p.shape[0] > 1


@contextmanager
def transposed_in_place(params: Iterable[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """While the block runs, each 2-D contiguous parameter's storage holds its transpose (see above).

    Yields the parameters re-laid out (each once; others, e.g. already strided ones, are left alone);
    always restores them, bitwise, on exit.
    """
    done: list[torch.Tensor] = []
    seen: set[int] = set()
    try:
        for p in params:
            if id(p) in seen or p.dim() != 2 or not p.is_contiguous() or min(p.shape) < 2:
                continue
            seen.add(id(p))
            _transpose_storage(p)
            done.append(p)
        yield done
    finally:
        for p in reversed(done):
            if _relaid(p):  # unless replaced inside the block
                _restore_storage(p)
