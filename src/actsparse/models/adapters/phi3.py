"""Phi-3 MLP with a fused `gate_up_proj`: gate and up are the two halves of one matmul."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from actsparse.models.adapters.base import FFNAdapter, GatedWeights, Site


class Phi3MLPAdapter(FFNAdapter):
    name = "phi3"

    def matches(self, module: nn.Module) -> bool:
        return (
            isinstance(getattr(module, "gate_up_proj", None), nn.Linear)
            and isinstance(getattr(module, "down_proj", None), nn.Linear)
            and hasattr(module, "activation_fn")
        )

    def forward(self, module: Any, site: Site, *args: torch.Tensor) -> torch.Tensor:
        (x,) = args
        x = site("input", x)
        gate, up = module.gate_up_proj(x).chunk(2, dim=-1)
        g = site("gate", module.activation_fn(gate))
        u = site("up", up)
        return module.down_proj(site("intermediate", u * g))

    def gated_weights(self, module: Any) -> GatedWeights:
        gate, up = module.gate_up_proj.weight.chunk(2, dim=0)
        gate_bias = up_bias = None
        if module.gate_up_proj.bias is not None:
            gate_bias, up_bias = module.gate_up_proj.bias.chunk(2, dim=0)
        return GatedWeights(
            gate=gate,
            up=up,
            down=module.down_proj.weight,
            act=module.activation_fn,
            gate_bias=gate_bias,
            up_bias=up_bias,
            down_bias=module.down_proj.bias,
        )
