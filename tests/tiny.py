"""Tiny random causal LMs of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)

FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": dict(head_dim=8),
    "gemma2": dict(head_dim=8),
    "gemma3_text": dict(head_dim=8, sliding_window=16),
    "phi3": {},
    "olmo2": {},
    "granite": {},
    "qwen2_moe": dict(MOE, shared_expert_intermediate_size=40),
    "qwen3_moe": dict(MOE, head_dim=8),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}
MOE_FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe")


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A 2-layer random model of `family` in eval mode, with eager attention."""
    config = AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if family in MOE_FAMILIES:  # the sparsified experts run the eager loop: compare like with like
        model.set_experts_implementation("eager")
    with torch.no_grad():  # random init draws some weights at 0.02 scale: widen them so activations vary
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model
