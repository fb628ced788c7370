"""Diffusion LLMs (LLaDA, diffusion_gemma): Monte-Carlo masked log-likelihood, iterative unmasking,
and the per-denoising-step statistics they feed (`SparsityStats.steps`). Names load on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

from actsparse._lazy import lazy_attributes

if TYPE_CHECKING:
    from actsparse.diffusion.denoisers import BlockDiffusionDenoiser, Denoiser, denoiser_for, is_diffusion_model
    from actsparse.diffusion.options import DiffusionOptions
    from actsparse.diffusion.scoring import denoising_steps, evaluate_diffusion_task, generate, mc_loglikelihood

__all__ = [
    "BlockDiffusionDenoiser",
    "Denoiser",
    "DiffusionOptions",
    "denoiser_for",
    "denoising_steps",
    "evaluate_diffusion_task",
    "generate",
    "is_diffusion_model",
    "mc_loglikelihood",
]

__getattr__, __dir__ = lazy_attributes(
    __name__,
    {
        "BlockDiffusionDenoiser": "actsparse.diffusion.denoisers",
        "Denoiser": "actsparse.diffusion.denoisers",
        "denoiser_for": "actsparse.diffusion.denoisers",
        "is_diffusion_model": "actsparse.diffusion.denoisers",
        "DiffusionOptions": "actsparse.diffusion.options",
        "denoising_steps": "actsparse.diffusion.scoring",
        "evaluate_diffusion_task": "actsparse.diffusion.scoring",
        "generate": "actsparse.diffusion.scoring",
        "mc_loglikelihood": "actsparse.diffusion.scoring",
    },
)
