"""Diffusion LLMs (LLaDA, diffusion_gemma): Monte-Carlo masked log-likelihood, iterative unmasking,
and the per-denoising-step statistics they feed (`SparsityStats.steps`)."""

from actsparse.diffusion.denoisers import (
    BlockDiffusionDenoiser,
    Denoiser,
    denoiser_for,
    is_diffusion_model,
)
from actsparse.diffusion.scoring import (
    DiffusionOptions,
    denoising_steps,
    evaluate_diffusion_task,
    generate,
    mc_loglikelihood,
)

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
