"""How diffusion LLMs are scored, apart from the scorer itself so that the command line reads its
defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiffusionOptions:
    """How diffusion models are scored: Monte-Carlo samples, generation length, steps and blocks."""

    mc_samples: int = 8
    seed: int = 0
    gen_length: int = 32
    steps: int = 32
    block_length: int = 32

    def __post_init__(self) -> None:
        for name in ("mc_samples", "gen_length", "steps", "block_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
