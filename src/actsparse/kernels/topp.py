"""Exact top-p mask, dispatched by device. For now: the sort-based path (see issue 4)."""

from __future__ import annotations

import torch


def top_p_mask_fast(v: torch.Tensor, p: float) -> torch.Tensor:
    """Exact top-p keep-mask of `v` along its last dimension (`p` already validated)."""
    from actsparse.rules import top_p_mask_sort

    return top_p_mask_sort(v, p)
