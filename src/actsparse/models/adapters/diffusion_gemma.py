"""transformers' `diffusion_gemma` (DiffusionGemmaForBlockDiffusion): an encoder over the prompt and a
block-diffusion decoder over the canvas, whose text layers each hold a dense gated MLP
(`gate_proj`/`up_proj`/`down_proj`/`act_fn`, the LLaMA layout) beside packed experts (the transformers-5
layout). Both stacks are adapted; they share weights, so layer N of either counts as layer N. The
vision tower is left alone (`find_ffns` skips modules under `vision`).
"""

from __future__ import annotations

from actsparse.models.adapters.base import FFNAdapter
from actsparse.models.adapters.llama import LlamaMLPAdapter
from actsparse.models.adapters.moe import PackedExpertsAdapter

DIFFUSION_GEMMA_ADAPTERS: tuple[FFNAdapter, ...] = (PackedExpertsAdapter(), LlamaMLPAdapter())
"""The adapters tried, in order, on each module of a diffusion_gemma text layer."""
