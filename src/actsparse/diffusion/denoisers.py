"""One interface over the diffusion LLMs: encode a prompt, predict a noisy canvas, and what noise is.

`MaskDenoiser` (LLaDA, in `actsparse.models.llada` with the rest of its family): an absorbing mask token,
one bidirectional network over prompt + canvas. `BlockDiffusionDenoiser` (transformers' diffusion_gemma):
uniform noise over the vocabulary, an encoder that writes the prompt's KV cache once, and a decoder over
the canvas with self-conditioning. `denoiser_for` looks a model's denoiser up by its `model_type`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from actsparse.evaluate.encode import position_ids
from actsparse.models.llada import MaskDenoiser
from actsparse.sparsity.instrument import set_real_tokens


class Denoiser(Protocol):
    """A masked-diffusion model behind three calls; implementations are small and stateless. A protocol, so
    that `models.llada` implements it without importing this package (which `adapters` would then import
    while it is itself being imported); the others subclass it for `__init__` and `device`."""

    model: Any
    noise_token: int | None = None
    """The token that means "noised" (never a prediction), or None for uniform noise."""

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def noise_tokens(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """`n` noise tokens (CPU) to put where the canvas is noised."""
        raise NotImplementedError

    def encode(self, prompts: torch.Tensor, prompt_mask: torch.Tensor) -> Any:
        """Whatever `predict` needs of the left-padded prompts [B, P] (a KV cache, or the ids)."""
        raise NotImplementedError

    def predict(
        self, state: Any, canvas: torch.Tensor, canvas_mask: torch.Tensor, previous: torch.Tensor | None = None
    ) -> torch.Tensor:
        """float32 logits [B, L, V] of the clean canvas given the noisy, right-padded `canvas` [B, L]."""
        raise NotImplementedError


class BlockDiffusionDenoiser(Denoiser):
    """diffusion_gemma: noise is uniform over the vocabulary; the decoder reads the encoder's cache.

    Encoder and decoder are called directly (the cache is reused across steps), so the real tokens
    of each call are handed to any running `sparsify` explicitly.
    """

    def noise_tokens(self, n: int, generator: torch.Generator) -> torch.Tensor:
        vocab = self.model.config.get_text_config().vocab_size
        return torch.randint(0, vocab, (n,), generator=generator)

    def encode(self, prompts: torch.Tensor, prompt_mask: torch.Tensor) -> Any:
        from transformers import DynamicCache

        inner = self.model.model
        cache = DynamicCache(config=self.model.config.get_text_config())
        set_real_tokens(self.model, prompt_mask)
        inner.encoder(
            input_ids=prompts, attention_mask=prompt_mask, position_ids=position_ids(prompt_mask), cache=cache
        )
        return cache, prompt_mask

    def predict(
        self, state: Any, canvas: torch.Tensor, canvas_mask: torch.Tensor, previous: torch.Tensor | None = None
    ) -> torch.Tensor:
        cache, prompt_mask = state
        positions = prompt_mask.sum(-1, keepdim=True) + torch.arange(canvas.shape[1], device=canvas.device)
        set_real_tokens(self.model, canvas_mask)
        hidden = self.model.model.decoder(
            decoder_input_ids=canvas,
            cache=cache,
            self_conditioning_logits=previous,
            decoder_attention_mask=torch.cat([prompt_mask, canvas_mask], dim=1),
            decoder_position_ids=positions,
        ).last_hidden_state
        logits = self.model.lm_head(hidden).float()
        cap = self.model.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits


def denoiser_for(model: nn.Module) -> Denoiser | None:
    """The denoiser of a diffusion LLM, or None for an autoregressive model."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "")
    if model_type == "llada":
        return MaskDenoiser(model, config.mask_token_id)  # type: ignore[union-attr]
    if model_type == "diffusion_gemma":
        return BlockDiffusionDenoiser(model)
    return None


def is_diffusion_model(model: nn.Module) -> bool:
    """Whether `model` is a diffusion LLM that the diffusion scorer handles."""
    return denoiser_for(model) is not None
