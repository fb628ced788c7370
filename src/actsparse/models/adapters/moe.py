"""Packed MoE experts of transformers 5 (qwen2_moe, qwen3_moe, mixtral, olmoe).

The experts of a layer live in two 3-D parameters, `gate_up_proj` [E, 2·d, h] and `down_proj`
[E, h, d]; the module is called with the flat hidden states [N, h], the routed expert indices and
their weights. Each routed token's vectors are sparsified inside each expert and counted per expert.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from actsparse.models.adapters.base import FFNAdapter, Site


class PackedExpertsAdapter(FFNAdapter):
    name = "moe_experts"

    def matches(self, module: nn.Module) -> bool:
        gate_up = getattr(module, "gate_up_proj", None)
        down = getattr(module, "down_proj", None)
        return (
            isinstance(gate_up, nn.Parameter)
            and isinstance(down, nn.Parameter)
            and gate_up.dim() == 3
            and down.dim() == 3
            and hasattr(module, "act_fn")
            and hasattr(module, "num_experts")
        )

    def forward(self, module: Any, site: Site, *args: torch.Tensor) -> torch.Tensor:
        hidden_states, top_k_index, top_k_weights = args
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            routed = F.one_hot(top_k_index, num_classes=module.num_experts + 1).permute(2, 1, 0)
            hit = routed.sum(dim=(-1, -2)).gt(0).nonzero().flatten().tolist()
        for expert in hit:
            if expert == module.num_experts:
                continue
            top_k_pos, token_idx = torch.where(routed[expert])
            x = site("input", hidden_states[token_idx], expert, token_idx)
            gate, up = F.linear(x, module.gate_up_proj[expert]).chunk(2, dim=-1)
            g = site("gate", module.act_fn(gate), expert, token_idx)
            u = site("up", up, expert, token_idx)
            i = site("intermediate", g * u, expert, token_idx)
            y = F.linear(i, module.down_proj[expert]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out
