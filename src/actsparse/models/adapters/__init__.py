"""FFN adapters: one small file per family, all presenting the same four vectors.

`find_ffns(model)` lists every FFN module of a supported causal LM with its decoder-layer index
and adapter; an unsupported `model_type` gets an error naming the supported ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from actsparse.models.adapters.base import FFNAdapter, GatedWeights, Site
from actsparse.models.adapters.diffusion_gemma import DIFFUSION_GEMMA_ADAPTERS
from actsparse.models.adapters.llada import LLaDAFeedForwardAdapter
from actsparse.models.adapters.llama import LlamaMLPAdapter
from actsparse.models.adapters.moe import PackedExpertsAdapter
from actsparse.models.adapters.phi3 import Phi3MLPAdapter

__all__ = ["FFN", "SUPPORTED_MODEL_TYPES", "FFNAdapter", "GatedWeights", "Site", "UnsupportedModelError", "find_ffns"]

_LLAMA = LlamaMLPAdapter()
_PHI3 = Phi3MLPAdapter()
_EXPERTS = PackedExpertsAdapter()

SUPPORTED_MODEL_TYPES: dict[str, tuple[FFNAdapter, ...]] = {
    "llama": (_LLAMA,),
    "mistral": (_LLAMA,),
    "qwen2": (_LLAMA,),
    "qwen3": (_LLAMA,),
    "gemma2": (_LLAMA,),
    "gemma3": (_LLAMA,),
    "gemma3_text": (_LLAMA,),
    "olmo2": (_LLAMA,),
    "granite": (_LLAMA,),
    "phi3": (_PHI3,),
    "qwen2_moe": (_EXPERTS, _LLAMA),
    "qwen3_moe": (_EXPERTS, _LLAMA),
    "mixtral": (_EXPERTS,),
    "olmoe": (_EXPERTS,),
    "llada": (LLaDAFeedForwardAdapter(),),
    "diffusion_gemma": DIFFUSION_GEMMA_ADAPTERS,
}
"""model_type → adapters to try, in order, on each module of its decoder layers."""

_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)\.")


class UnsupportedModelError(ValueError):
    """No adapter knows this model's FFN."""


@dataclass(frozen=True)
class FFN:
    """One FFN module of a model: its name, decoder-layer index and adapter."""

    name: str
    layer: int
    module: nn.Module
    adapter: FFNAdapter


def _model_types(model: nn.Module) -> list[str]:
    config = getattr(model, "config", None)
    if config is None:
        return []
    types = [getattr(config, "model_type", "")]
    if hasattr(config, "get_text_config"):
        types.append(getattr(config.get_text_config(), "model_type", ""))
    return [t for t in types if t]


def find_ffns(model: nn.Module) -> list[FFN]:
    """Every FFN of the model's decoder layers, in layer order."""
    types = _model_types(model)
    adapters = next((SUPPORTED_MODEL_TYPES[t] for t in types if t in SUPPORTED_MODEL_TYPES), None)
    if adapters is None:
        raise UnsupportedModelError(
            f"no FFN adapter for model_type {types[0] if types else type(model).__name__!r}; "
            f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
        )
    ffns = []
    for name, module in model.named_modules():
        layer = _LAYER.search(name + ".")
        if layer is None or "vision" in name:
            continue
        adapter = next((a for a in adapters if a.matches(module)), None)
        if adapter is not None:
            ffns.append(FFN(name, int(layer.group(1)), module, adapter))
    if not ffns:
        raise UnsupportedModelError(
            f"model_type {types[0]!r} is supported but no FFN module was found in {type(model).__name__}"
        )
    return ffns
