"""LLaMA-like gated MLP: `down_proj(act_fn(gate_proj(x)) * up_proj(x))`.

Used as is by llama, mistral, qwen2, qwen3, gemma2, gemma3, olmo2, granite and the shared experts
of qwen2_moe.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from actsparse.adapters.base import FFNAdapter, GatedWeights, Site


class LlamaMLPAdapter(FFNAdapter):
    name = "llama"

    def matches(self, module: nn.Module) -> bool:
        return all(
            isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")
        ) and hasattr(module, "act_fn")

    def forward(self, module: Any, site: Site, *args: torch.Tensor) -> torch.Tensor:
        (x,) = args
        x = site("input", x)
        g = site("gate", module.act_fn(module.gate_proj(x)))
        u = site("up", module.up_proj(x))
        return module.down_proj(site("intermediate", g * u))

    def gated_weights(self, module: Any) -> GatedWeights:
        return GatedWeights(
            gate=module.gate_proj.weight,
            up=module.up_proj.weight,
            down=module.down_proj.weight,
            act=module.act_fn,
            gate_bias=module.gate_proj.bias,
            up_bias=module.up_proj.bias,
            down_bias=module.down_proj.bias,
        )
