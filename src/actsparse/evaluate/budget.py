"""How much one forward of the scorer may hold: a token budget (and a budget of logits), chosen from
free device memory on CUDA, fixed on CPU, halved on out-of-memory so that a point is never lost."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

CPU_TOKENS = 4096
"""Tokens (padding included) of one forward on CPU: large enough to amortise a forward's fixed cost."""
LOGITS = 1 << 26
"""Logits (floats) of one packed forward on CPU: 256 MB, 1365 scored positions of a 49k vocabulary."""
MEMORY_SHARE = 0.5
"""Share of the free device memory a forward's activations may use (the rest: allocator slack, logits)."""
MAX_TOKENS = 1 << 16
MIN_TOKENS = 16
"""A budget halved below this after out-of-memory gives up: the model itself does not fit."""

OutOfMemory: type[BaseException] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
"""What a forward raises when the device runs out of memory (torch.OutOfMemoryError)."""


@dataclass(frozen=True)
class Budget:
    """Tokens (padding included) and logits (floats) of one forward."""

    tokens: int = CPU_TOKENS
    logits: int = LOGITS

    def halved(self) -> Budget:
        """The budget to retry with after out-of-memory; ValueError when it cannot shrink further."""
        if self.tokens <= MIN_TOKENS:
            raise ValueError(f"out of memory even with a budget of {self.tokens} tokens per forward")
        return Budget(max(MIN_TOKENS, self.tokens // 2), max(1, self.logits // 2))


def _text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def bytes_per_token(model: Any, width: int = 1024) -> int:
    """Activation bytes one token of a forward holds at its peak, rows `width` wide: the FFN's vectors
    and residual stream, the attention scores and mask of its row, and its KV cache (cached path)."""
    config = _text_config(model)
    h = int(getattr(config, "hidden_size", 1024))
    d = int(getattr(config, "intermediate_size", 4 * h) or 4 * h)
    heads = int(getattr(config, "num_attention_heads", 16))
    kv_heads = int(getattr(config, "num_key_value_heads", heads) or heads)
    head_dim = int(getattr(config, "head_dim", None) or h // max(heads, 1))
    layers = int(getattr(config, "num_hidden_layers", 1))
    size = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4)
    activations = size * (6 * h + 3 * d)
    attention = size * width * (heads + 1)
    cache = 2 * layers * kv_heads * head_dim * size
    return activations + attention + cache


def auto_budget(model: Any) -> Budget:
    """The budget for `model` where its weights live: from free memory on CUDA, CPU_TOKENS on CPU."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return Budget()
    free, _ = torch.cuda.mem_get_info(device)
    tokens = int(free * MEMORY_SHARE // bytes_per_token(model))
    vocab = int(getattr(_text_config(model), "vocab_size", 1) or 1)
    logits = int(free * 0.25 // 8)  # floats: the float32 logits and their log-softmax in place
    return Budget(max(MIN_TOKENS, min(MAX_TOKENS, tokens)), max(vocab, logits))


def free_memory(model: Any) -> None:
    """Return cached blocks to the device after out-of-memory, so the retry starts clean."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and next(model.parameters()).device.type == "cuda":
        torch.cuda.empty_cache()


__all__ = ["LOGITS", "Budget", "OutOfMemory", "auto_budget", "bytes_per_token", "free_memory"]
