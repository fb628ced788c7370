"""LLaDA's SwiGLU FFN: `ff_out(act(ff_proj(x)) * up_proj(x))` — ff_proj is the gate, up_proj the up.

The linears sit directly on each LLaDA block (checkpoint names); actsparse's LLaDA definition
exposes them through a parameter-free `LLaDAFeedForward` view, which is the module adapted here
(the block itself, which also has attention, does not match).
"""

from __future__ import annotations

from torch import nn

from actsparse.adapters.llama import LlamaMLPAdapter


class LLaDAFeedForwardAdapter(LlamaMLPAdapter):
    name = "llada"

    def __init__(self) -> None:
        super().__init__(gate="ff_proj", up="up_proj", down="ff_out", act="act")

    def matches(self, module: nn.Module) -> bool:
        return super().matches(module) and not hasattr(module, "attn_out")  # the view, not the block
