"""LLaDA's SwiGLU FFN: `ff_out(act(ff_proj(x)) * up_proj(x))` — ff_proj is the gate, up_proj the up.

The linears sit directly on each LLaDA block (checkpoint names); actsparse's LLaDA definition
exposes them through a parameter-free `LLaDAFeedForward` view, which is the module adapted here
(the block itself, which also has attention, does not match).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from actsparse.adapters.base import FFNAdapter, GatedWeights, Site


class LLaDAFeedForwardAdapter(FFNAdapter):
    name = "llada"

    def matches(self, module: nn.Module) -> bool:
        linears = all(isinstance(getattr(module, n, None), nn.Linear) for n in ("ff_proj", "up_proj", "ff_out"))
        return linears and hasattr(module, "act") and not hasattr(module, "attn_out")  # the view, not the block

    def forward(self, module: Any, site: Site, *args: torch.Tensor) -> torch.Tensor:
        (x,) = args
        x = site("input", x)
        g = site("gate", module.act(module.ff_proj(x)))
        u = site("up", module.up_proj(x))
        return module.ff_out(site("intermediate", g * u))

    def gated_weights(self, module: Any) -> GatedWeights:
        return GatedWeights(
            gate=module.ff_proj.weight,
            up=module.up_proj.weight,
            down=module.ff_out.weight,
            act=module.act,
            gate_bias=module.ff_proj.bias,
            up_bias=module.up_proj.bias,
            down_bias=module.ff_out.bias,
        )
