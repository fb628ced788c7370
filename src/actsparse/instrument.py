"""`sparsify(model, spec)`: run a model with a rule applied to one target of every FFN.

Each FFN's forward is replaced, through its adapter, by one that passes every activation vector
through a `RuleSite`; a pre-hook on the model records which tokens are real (attention mask) and
whether the call is prefill or decode. Leaving the context always restores the model.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from actsparse.adapters import FFN, find_ffns
from actsparse.rules import NonFiniteActivationError, masked
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
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 generate passes `cache`
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


def non_finite(vector: str, layer: int, expert: int | None = None) -> NonFiniteActivationError:
    """The error for NaN or ±Inf in an activation, naming where it was found."""
    where = f", expert {expert}" if expert is not None else ""
    return NonFiniteActivationError(f"NaN or Inf in the {vector!r} activation of layer {layer}{where}")


def count_entries(v: torch.Tensor, keep: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """[zeroed, natural zeros, seen] of one activation over its real rows (all rows when `real` is None).

    zeroed = seen − kept, natural zeros = seen − nonzero: cheap reductions only, no host sync.
    """
    with torch.no_grad():
        if real is None:
            seen = torch.full((), keep.numel(), device=v.device)  # a fill, not a host-to-device copy
            return torch.stack([seen - keep.sum(), seen - torch.count_nonzero(v), seen])
        seen = real.sum() * v.shape[-1]
        kept = keep.sum(dim=-1)[real].sum()
        nonzero = torch.count_nonzero(v, dim=-1)[real].sum()
        return torch.stack([seen - kept, seen - nonzero, seen])


class RuleSite:
    """Applies the spec's rule to the vectors it targets in one FFN layer, and counts."""

    def __init__(self, spec: SparsitySpec, layer: int, tokens: TokenContext, stats: SparsityStats):
        self.spec, self.layer, self.tokens, self.stats = spec, layer, tokens, stats

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
            sparse, keep = self.masked(vector, v)
        except NonFiniteActivationError:
            raise non_finite(vector, self.layer, expert) from None
        real = self.tokens.rows(v, token_index)
        self.stats.record((self.layer, vector, self.tokens.phase, expert), count_entries(v, keep, real))
        if self.stats.step is not None:  # a diffusion scorer is counting per denoising step
            self.stats.steps.record(self.stats.step, self.layer, vector, keep if real is None else keep[real], expert)
        return sparse

    def masked(self, vector: str, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparsified v, keep-mask) of the spec's rule; `actsparse.methods` overrides it per method."""
        return masked(v, self.spec.rule, self.spec.value_for(self.layer, vector))


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


def _forward_slot(module: nn.Module) -> str:
    """Where the module's own forward lives: accelerate's hooks (device_map, offload) keep it as
    `_old_forward` inside a hooked instance `forward`, which must keep running around it."""
    hooked = getattr(module, "_hf_hook", None) is not None and "_old_forward" in vars(module)
    return "_old_forward" if hooked else "forward"


@contextmanager
def replaced_forwards(model: nn.Module, ffns: list[FFN], make_forward) -> Iterator[TokenContext]:
    """Replace each FFN's forward by `make_forward(ffn, tokens)` for the block; always restore.

    On a module dispatched by accelerate the hook stays and calls the replacement, so device moves
    and offloaded weights keep working.
    """
    tokens = TokenContext()
    saved: list[tuple[nn.Module, str, Any]] = []
    handle = model.register_forward_pre_hook(tokens.hook, with_kwargs=True)
    try:
        for ffn in ffns:
            slot = _forward_slot(ffn.module)
            saved.append((ffn.module, slot, ffn.module.__dict__.get(slot)))
            setattr(ffn.module, slot, make_forward(ffn, tokens))
        yield tokens
    finally:
        handle.remove()
        for module, slot, previous in reversed(saved):
            if previous is None:
                delattr(module, slot)
            else:
                setattr(module, slot, previous)


@contextmanager
def instrumented(
    model: nn.Module,
    spec: SparsitySpec,
    layers: list[int] | None,
    make_forward: Callable[[FFN, TokenContext, SparsityStats], Callable[..., torch.Tensor]],
) -> Iterator[SparsityStats]:
    """Check `spec` against the model, swap each FFN's forward for `make_forward(ffn, tokens, stats)`
    and make the stats reachable by scorers (`active_stats`) while the block runs; always restore."""
    if not isinstance(spec, SparsitySpec):
        raise TypeError(f"spec must be a SparsitySpec, got {type(spec).__name__}")
    ffns = select_ffns(model, layers)
    if spec.rule == "threshold":
        missing = sorted({f.layer for f in ffns} - set(spec.thresholds))
        if missing:
            raise ValueError(f"no calibrated threshold for layers {missing}")
    stats = SparsityStats(spec.vectors)
    with replaced_forwards(model, ffns, lambda ffn, tokens: make_forward(ffn, tokens, stats)) as tokens:
        active = _ACTIVE.setdefault(model, [])
        active.append((stats, tokens))
        try:
            yield stats
        finally:
            active.remove((stats, tokens))


@contextmanager
def sparsify(model: nn.Module, spec: SparsitySpec, layers: list[int] | None = None) -> Iterator[SparsityStats]:
    """Sparsify `spec.target` of every FFN (or of `layers`) while the block runs.

    Yields a `SparsityStats` that fills as the model runs; the model is restored on exit.
    """

    def make_forward(ffn: FFN, tokens: TokenContext, stats: SparsityStats) -> Callable[..., torch.Tensor]:
        return partial(ffn.adapter.forward, ffn.module, RuleSite(spec, ffn.layer, tokens, stats))

    with instrumented(model, spec, layers, make_forward) as stats:
        yield stats


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, list[tuple[SparsityStats, TokenContext]]] = weakref.WeakKeyDictionary()


def active_stats(model: nn.Module) -> list[SparsityStats]:
    """The statistics of the `sparsify` blocks now running on `model` (for scorers that count per step)."""
    return [stats for stats, _ in _ACTIVE.get(model, ())]


def set_real_tokens(model: nn.Module, real: torch.Tensor | None) -> None:
    """Tell the running `sparsify` blocks which tokens are real ([B, T] bool), for a scorer that calls
    a model's submodules directly (the model's pre-hook does not see those calls)."""
    for _, tokens in _ACTIVE.get(model, ()):
        tokens.real, tokens.phase = (None if real is None else real.bool()), "prefill"
