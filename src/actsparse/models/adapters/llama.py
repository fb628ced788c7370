"""LLaMA-like gated MLP: `down_proj(act_fn(gate_proj(x)) * up_proj(x))`.

Used as is by llama, mistral, qwen2, qwen3, gemma2, gemma3, olmo2, granite and the shared experts
of qwen2_moe; with other attribute names by LLaDA (`adapters/llada.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from actsparse.models.adapters.base import FFNAdapter, GatedWeights, Site


class LlamaMLPAdapter(FFNAdapter):
    """Three separate nn.Linear (gate, up, down) and an activation, found by attribute name."""

    name = "llama"

    def __init__(self, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj", act: str = "act_fn"):
        self.gate, self.up, self.down, self.act = gate, up, down, act

    def matches(self, module: nn.Module) -> bool:
        linears = (getattr(module, n, None) for n in (self.gate, self.up, self.down))
        return all(isinstance(m, nn.Linear) for m in linears) and hasattr(module, self.act)

    def forward(self, module: Any, site: Site, *args: torch.Tensor) -> torch.Tensor:
        (x,) = args
        gate, up, down, act = (getattr(module, n) for n in (self.gate, self.up, self.down, self.act))
        x = site("input", x)
        g = site("gate", act(gate(x)))
        u = site("up", up(x))
        return down(site("intermediate", g * u))

    def gated_weights(self, module: Any) -> GatedWeights:
        gate, up, down = (getattr(module, n) for n in (self.gate, self.up, self.down))
        return GatedWeights(
            gate=gate.weight,
            up=up.weight,
            down=down.weight,
            act=getattr(module, self.act),
            gate_bias=gate.bias,
            up_bias=up.bias,
            down_bias=down.bias,
        )
