"""LLaDA's SwiGLU FFN (`models/llada.py` defines the model): `ff_out(act(ff_proj(x)) * up_proj(x))`, the
LLaMA layout under other names. Here, not beside the model, so that importing either never imports the other
half-way (the model file imports transformers; this one, only the LLaMA adapter)."""

from __future__ import annotations

from torch import nn

from actsparse.models.adapters.llama import LlamaMLPAdapter


class LLaDAFeedForwardAdapter(LlamaMLPAdapter):
    """LLaDA's FFN for `sparsify`: ff_proj the gate, up_proj the up. The adapted module is the parameter-free
    `LLaDAFeedForward` view, not the block (which also has attention)."""

    name = "llada"

    def __init__(self) -> None:
        super().__init__(gate="ff_proj", up="up_proj", down="ff_out", act="act")

    def matches(self, module: nn.Module) -> bool:
        return super().matches(module) and not hasattr(module, "attn_out")  # the view, not the block
