"""Tiny random diffusion LLMs built from configs (no downloads): LLaDA layout and diffusion_gemma."""

from __future__ import annotations

import torch
from tiny import widen

from actsparse.models.llada import LLaDAConfig, LLaDAModelLM

VOCAB = 97
MASK_ID = 96

LLADA_CONFIG = dict(
    d_model=32,
    n_heads=4,
    n_kv_heads=2,
    n_layers=2,
    mlp_hidden_size=64,
    max_sequence_length=128,
    vocab_size=VOCAB,
    embedding_size=VOCAB,
    rope_theta=10000.0,
    mask_token_id=MASK_ID,
    pad_token_id=0,
    eos_token_id=1,
)


def tiny_llada(seed: int = 0, **overrides) -> LLaDAModelLM:
    """A 2-layer random LLaDA (real parameter names and config keys) in eval mode."""
    torch.manual_seed(seed)
    model = LLaDAModelLM(LLaDAConfig(**(LLADA_CONFIG | overrides))).eval()
    widen(model)
    return model


def tiny_diffusion_gemma(seed: int = 0):
    """A 2-layer random DiffusionGemmaForBlockDiffusion (dense MLP + 4 packed experts per layer)."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        global_head_dim=8,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=48,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        position_embedding_size=64,
    )
    config = DiffusionGemmaConfig(
        text_config=text, vision_config=vision, canvas_length=8, boi_token_id=90, eoi_token_id=91, image_token_id=92
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    model.set_experts_implementation("eager")
    widen(model)
    return model
