"""Packed MoE experts of transformers 5 (qwen2_moe, qwen3_moe, mixtral, olmoe).

The experts of a layer live in two 3-D parameters, `gate_up_proj` [E, 2·d, h] and `down_proj`
[E, h, d]; the module is called with the flat hidden states [N, h], the routed expert indices and
their weights. Each routed token's vectors are sparsified inside each expert and counted per expert.

transformers runs the experts by one of several implementations (`config._experts_implementation`:
`eager`, a loop over experts; `batched_mm`, one batched product over every (token, expert) pair;
`grouped_mm`, the default, pairs sorted by expert through grouped products). The instrumented forward
follows the model's own, product for product, so that a rule that keeps everything (top_p at p = 1)
gives the dense logits bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
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
        return experts_forward(module)(module, site, *args)


def experts_forward(module: Any) -> Callable[..., torch.Tensor]:
    """The instrumented forward that follows `module`'s experts implementation; a ValueError for one it has not."""
    config = getattr(module, "config", None)
    implementation = getattr(config, "_experts_implementation", None) or "eager"
    if implementation not in FORWARDS:
        raise ValueError(
            f"the sparsified experts follow transformers' {', '.join(FORWARDS)} experts implementations, not "
            f"{implementation!r}: call model.set_experts_implementation('grouped_mm') first"
        )
    gate = getattr(type(module), "_apply_gate", None)
    if (gate is not None and gate.__name__ != "_default_apply_gate") or not getattr(module, "has_gate", True):
        raise ValueError(f"{type(module).__name__} gates its experts its own way; only act(gate) · up is supported")
    unusual = [flag for flag in ("has_bias", "has_post_expert_norm", "is_transposed") if getattr(module, flag, False)]
    if unusual:
        raise ValueError(f"{type(module).__name__}'s experts are not supported ({', '.join(unusual)})")
    return FORWARDS[implementation]


def _eager(module: Any, site: Site, hidden_states: torch.Tensor, top_k_index, top_k_weights) -> torch.Tensor:
    """transformers' eager experts loop (the experts classes' own forward), each vector through `site`."""
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
        i = _gated(site, module, gate, up, expert, token_idx)
        y = F.linear(i, module.down_proj[expert]) * top_k_weights[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def _gated(site: Site, module: Any, gate: torch.Tensor, up: torch.Tensor, expert: Any, token_idx: Any) -> torch.Tensor:
    """i = act(gate) · up (transformers' `_default_apply_gate`), with gate, up and i through `site`."""
    g = site("gate", module.act_fn(gate), expert, token_idx)
    u = site("up", up, expert, token_idx)
    return site("intermediate", g * u, expert, token_idx)


class _PerExpert:
    """A `Site` over rows of (token, expert) pairs of several experts: each expert's rows go to `site`
    together, as in the eager loop, so that counts stay per expert; the rows keep their order."""

    def __init__(self, site: Site, expert_ids: torch.Tensor, token_index: torch.Tensor):
        self.site, self.token_index = site, token_index
        with torch.no_grad():
            self.groups = [(int(e), (expert_ids == e).nonzero().flatten()) for e in expert_ids.unique().tolist()]

    def __call__(self, vector: str, v: torch.Tensor, expert: Any = None, token_index: Any = None) -> torch.Tensor:
        out = torch.empty_like(v)
        for e, rows in self.groups:
            out[rows] = self.site(vector, v[rows], e, self.token_index[rows])
        return out


def _batched_mm(module: Any, site: Site, hidden_states: torch.Tensor, top_k_index, top_k_weights) -> torch.Tensor:
    """transformers' `batched_mm_experts_forward`: one batched product per projection over every pair."""
    from transformers.integrations.moe import _batched_linear

    num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    expert_ids = top_k_index.reshape(-1)
    token_index = torch.arange(num_tokens, device=hidden_states.device).repeat_interleave(num_top_k)
    per_expert = _PerExpert(site, expert_ids, token_index)
    x = per_expert("input", hidden_states.repeat_interleave(num_top_k, dim=0))
    gate, up = _batched_linear(x, module.gate_up_proj[expert_ids]).chunk(2, dim=-1)
    i = _gated(per_expert, module, gate, up, None, None)
    y = _batched_linear(i, module.down_proj[expert_ids])
    weighted = y * top_k_weights.reshape(-1).unsqueeze(-1)
    return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _grouped_mm(module: Any, site: Site, hidden_states: torch.Tensor, top_k_index, top_k_weights) -> torch.Tensor:
    """transformers' `grouped_mm_experts_forward`: pairs sorted by expert, one grouped product per projection."""
    from transformers.integrations.moe import _grouped_linear

    device = hidden_states.device
    num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    token_index = perm // num_top_k
    histc_input = expert_ids.float() if device.type in ("cpu", "mps") else expert_ids.int()
    per_expert_counts = torch.histc(histc_input, bins=module.num_experts, min=0, max=module.num_experts - 1)
    offsets = torch.cumsum(per_expert_counts, dim=0, dtype=torch.int32)
    per_expert = _PerExpert(site, expert_ids, token_index)
    x = per_expert("input", hidden_states[token_index])
    gate, up = _grouped_linear(x, module.gate_up_proj, offsets).chunk(2, dim=-1)
    i = _gated(per_expert, module, gate, up, None, None)
    y = _grouped_linear(i, module.down_proj, offsets)
    weighted = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    return weighted[inv_perm].view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


FORWARDS: dict[str, Callable[..., torch.Tensor]] = {
    "eager": _eager,
    "batched_mm": _batched_mm,
    "grouped_mm": _grouped_mm,
}
"""transformers' experts implementation → the instrumented forward that follows it."""
