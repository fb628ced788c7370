"""`sparsify(model, spec)`: run a model with a rule applied to one target of every FFN.

Each FFN's forward is replaced, through its adapter, by one that passes every activation vector
through a `_Site`; a pre-hook on the model records which tokens are real (attention mask) and
whether the call is prefill or decode. Leaving the context always restores the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from actsparse.adapters import FFN, find_ffns
from actsparse.rules import RULES, NonFiniteActivationError, apply_mask
from actsparse.spec import SparsitySpec
from actsparse.stats import SparsityStats


class TokenContext:
    """Which tokens of the current forward are real, and its phase; set by a model pre-hook."""

    def __init__(self) -> None:
        self.real: torch.Tensor | None = None  # [B, T] bool, or None when every token is real
        self.phase = "prefill"

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        if ids is None:
            self.real, self.phase = None, "prefill"
            return
        batch, length = ids.shape[0], ids.shape[1]
        self.real = mask[:, -length:].bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            past = max(past, mask.shape[1] - length)
        self.phase = "decode" if length == 1 and past > 0 else "prefill"
        if self.real is not None and self.real.shape != (batch, length):
            self.real = None

    def rows(self, v: torch.Tensor, token_index: torch.Tensor | None) -> torch.Tensor | None:
        """The real-token flags matching the leading dimensions of `v` (None: all real)."""
        if self.real is None:
            return None
        real = self.real.reshape(-1)
        if token_index is not None:
            real = real[token_index]
        rows = v.shape[:-1].numel()
        return real.reshape(v.shape[:-1]) if real.numel() == rows else None


class _Site:
    """Applies the spec's rule to the vectors it targets in one FFN layer, and counts."""

    def __init__(self, spec: SparsitySpec, layer: int, tokens: TokenContext, stats: SparsityStats):
        self.spec, self.layer, self.tokens, self.stats = spec, layer, tokens, stats
        self.mask_fn = RULES[spec.rule]

    def __call__(
        self,
        vector: str,
        v: torch.Tensor,
        expert: int | None = None,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if vector not in self.spec.vectors:
            return v
        try:
            keep = self.mask_fn(v, self.spec.value_for(self.layer, vector))
        except NonFiniteActivationError:
            raise NonFiniteActivationError(
                f"NaN or Inf in the {vector!r} activation of layer {self.layer}"
                + (f", expert {expert}" if expert is not None else "")
            ) from None
        real = self.tokens.rows(v, token_index)
        with torch.no_grad():
            zeroed = (~keep).sum(dim=-1)
            natural = (v == 0).sum(dim=-1)
            if real is None:
                counts = torch.stack([zeroed.sum(), natural.sum(), torch.tensor(zeroed.numel() * v.shape[-1])])
            else:
                counts = torch.stack([zeroed[real].sum(), natural[real].sum(), real.sum() * v.shape[-1]])
        self.stats.record((self.layer, vector, self.tokens.phase, expert), counts)
        return apply_mask(v, keep)


def select_ffns(model: nn.Module, layers: list[int] | None) -> list[FFN]:
    """The model's FFNs, restricted to `layers` (checked against the model's layer indices)."""
    ffns = find_ffns(model)
    if layers is not None:
        known = {f.layer for f in ffns}
        unknown = sorted(set(layers) - known)
        if unknown:
            raise ValueError(f"layers {unknown} not in the model (it has {min(known)}..{max(known)})")
        ffns = [f for f in ffns if f.layer in set(layers)]
    return ffns


@contextmanager
def replaced_forwards(model: nn.Module, ffns: list[FFN], make_forward) -> Iterator[TokenContext]:
    """Replace each FFN's forward by `make_forward(ffn, tokens)` for the block; always restore."""
    tokens = TokenContext()
    saved: list[tuple[nn.Module, Any]] = []
    handle = model.register_forward_pre_hook(tokens.hook, with_kwargs=True)
    try:
        for ffn in ffns:
            saved.append((ffn.module, ffn.module.__dict__.get("forward")))
            ffn.module.forward = make_forward(ffn, tokens)
        yield tokens
    finally:
        handle.remove()
        for module, previous in saved:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


@contextmanager
def sparsify(model: nn.Module, spec: SparsitySpec, layers: list[int] | None = None) -> Iterator[SparsityStats]:
    """Sparsify `spec.target` of every FFN (or of `layers`) while the block runs.

    Yields a `SparsityStats` that fills as the model runs; the model is restored on exit.
    """
    if not isinstance(spec, SparsitySpec):
        raise TypeError(f"spec must be a SparsitySpec, got {type(spec).__name__}")
    ffns = select_ffns(model, layers)
    if spec.rule == "threshold":
        missing = sorted({f.layer for f in ffns} - set(spec.thresholds))
        if missing:
            raise ValueError(f"no calibrated threshold for layers {missing}")
    stats = SparsityStats(spec.vectors)

    def make_forward(ffn: FFN, tokens: TokenContext):
        return partial(ffn.adapter.forward, ffn.module, _Site(spec, ffn.layer, tokens, stats))

    with replaced_forwards(model, ffns, make_forward):
        yield stats
