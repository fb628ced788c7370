"""The adapter interface: how one family's FFN module exposes the four activation vectors."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from actsparse.speed.kernels._common import GatedWeights

__all__ = ["FFNAdapter", "GatedWeights", "Site"]


class Site(Protocol):
    """Where an adapter hands each activation vector to the instrumentation.

    Called with the vector name (`input`, `gate`, `up`, `intermediate`) and the tensor; returns the
    tensor to use from there on (sparsified or unchanged). MoE adapters also pass the expert index
    and the flat indices of the tokens routed to it, so that padding and per-expert counts are right.
    """

    def __call__(
        self, vector: str, v: torch.Tensor, expert: int | None = None, token_index: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class FFNAdapter:
    """Maps one family's FFN module onto the four vectors. Subclasses are small and stateless."""

    name: str = ""

    def matches(self, module: nn.Module) -> bool:
        """Whether `module` is an FFN this adapter can run."""
        raise NotImplementedError

    def forward(self, module: nn.Module, site: Site, *args: torch.Tensor) -> torch.Tensor:
        """The module's forward, with every activation vector passed through `site`."""
        raise NotImplementedError

    def gated_weights(self, module: nn.Module) -> GatedWeights | None:
        """The dense weights of a single gated FFN (None for packed experts)."""
        return None
