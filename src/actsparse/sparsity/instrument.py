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

from actsparse.models.adapters import FFN, find_ffns
from actsparse.sparsity.registry import METHOD_MASK, MODEL_DATA, get_rule, resolve
from actsparse.sparsity.rules import NonFiniteActivationError, apply_mask, masked
from actsparse.sparsity.spec import SparsitySpec
from actsparse.sparsity.stats import SparsityStats


class PaddingUnknownError(ValueError):
    """The real tokens of a forward cannot be told from padding, so its sparsity cannot be counted."""


class TokenContext:
    """Which tokens of the current forward are real, and its phase; set by a model pre-hook.

    Strict: padding never counts as real. Without an attention mask only a single sequence is known
    to be all real; a mask of another shape (a 4D mask, say) must be completed by the caller through
    `set_real_tokens`, else counting raises `PaddingUnknownError`.
    """

    def __init__(self) -> None:
        self.real: torch.Tensor | None = None  # [B, T] bool, or None when every token is real
        self.phase = "prefill"
        self.unknown: str | None = None  # why the real tokens of this forward are not known
        self.prefill_only = False  # a scorer's one-token continuation chunks over a cache are prefill

    def hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        self.real, self.phase, self.unknown = None, "prefill", None
        if ids is None:
            self.unknown = "the forward got neither input_ids nor inputs_embeds"
            return
        batch, length = ids.shape[0], ids.shape[1]
        cache = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 generate passes `cache`
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            past = max(past, mask.shape[1] - length)
        self.phase = "decode" if length == 1 and past > 0 and not self.prefill_only else "prefill"
        if mask is None:
            if batch > 1:
                self.unknown = f"no attention_mask for a batch of {batch} sequences"
        elif not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            self.unknown = f"a {getattr(mask, 'dim', lambda: '?')()}-D attention_mask"
        elif mask.shape[0] != batch or mask.shape[1] < length:
            self.unknown = f"an attention_mask of shape {tuple(mask.shape)} for input of shape {(batch, length)}"
        else:
            self.real = mask[:, -length:].bool()

    def rows(self, v: torch.Tensor, token_index: torch.Tensor | None) -> torch.Tensor | None:
        """The real-token flags matching the leading dimensions of `v` (None: all real)."""
        if self.unknown is not None:
            raise PaddingUnknownError(
                f"cannot tell real tokens from padding ({self.unknown}): pass a 2-D attention_mask "
                "[batch, length], or state the real tokens with `set_real_tokens`"
            )
        if self.real is None:
            return None
        real = self.real.reshape(-1)
        if token_index is not None:
            real = real[token_index]
        rows = v.shape[:-1].numel()
        if real.numel() != rows:
            raise PaddingUnknownError(
                f"real-token flags for {real.numel()} tokens, but an activation of {rows} tokens {tuple(v.shape)}"
            )
        return real.reshape(v.shape[:-1])

    def real_rows(self, v: torch.Tensor, token_index: torch.Tensor | None) -> torch.Tensor:
        """The rows of `v` at real tokens, detached, as [N, d]: what a site collects of an activation."""
        real = self.rows(v, token_index)
        return (v if real is None else v[real]).detach().reshape(-1, v.shape[-1])


def non_finite(vector: str, layer: int, expert: int | None = None) -> NonFiniteActivationError:
    """The error for NaN or ±Inf in an activation, naming where it was found."""
    where = f", expert {expert}" if expert is not None else ""
    return NonFiniteActivationError(f"NaN or Inf in the {vector!r} activation of layer {layer}{where}")


def count_entries(v: torch.Tensor, keep: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """[zeroed, natural zeros, seen] of one activation over its real rows (all rows when `real` is None).

    zeroed = seen − kept, natural zeros = seen − nonzero: cheap reductions only, no host sync (the real
    rows are weighted, not selected: a boolean index would wait for the GPU to know its size).
    """
    with torch.no_grad():
        if real is None:
            seen = torch.full((), keep.numel(), device=v.device)  # a fill, not a host-to-device copy
            return torch.stack([seen - keep.sum(), seen - torch.count_nonzero(v), seen])
        weight = real.to(torch.int64)
        seen = weight.sum() * v.shape[-1]
        kept = (keep.sum(dim=-1) * weight).sum()
        nonzero = (torch.count_nonzero(v, dim=-1) * weight).sum()
        return torch.stack([seen - kept, seen - nonzero, seen])


class RuleSite:
    """Applies the spec's rule to the vectors it targets in one FFN layer, and counts."""

    def __init__(self, spec: SparsitySpec, layer: int, tokens: TokenContext, stats: SparsityStats):
        self.spec, self.layer, self.tokens, self.stats = spec, layer, tokens, stats
        self.method = get_rule(spec.rule).method
        self.x: torch.Tensor | None = None  # the FFN input, which the predictor reads

    def __call__(
        self, vector: str, v: torch.Tensor, expert: int | None = None, token_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        if vector == "input":
            self.x = v
        if vector not in self.spec.vectors:
            return v
        try:
            sparse, keep = self.masked(vector, v)
        except NonFiniteActivationError:
            raise non_finite(vector, self.layer, expert) from None
        real = self.tokens.rows(v, token_index)
        self.stats.record((self.layer, vector, self.tokens.phase, expert), count_entries(v, keep, real))
        if self.stats.per_token is not None:  # a scorer is counting per document
            known = self.tokens.real
            self.stats.per_token.add(keep, real, token_index, None if known is None else known.numel())
        if self.stats.step is not None:  # a diffusion scorer is counting per denoising step
            self.stats.steps.record(self.stats.step, self.layer, vector, keep if real is None else keep[real], expert)
        return sparse

    def masked(self, vector: str, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sparsified v, keep-mask) of the spec's rule; a method rule's mask from `methods.method_mask`."""
        if not self.method:
            return masked(v, self.spec.rule, self.spec.value_for(self.layer, vector))
        keep = resolve(METHOD_MASK)(self.spec, self.layer, vector, v, self.x)
        return apply_mask(v, keep), keep


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

    A forward is recorded only once it is replaced, so a failure at any layer (in `make_forward`, or in
    the block) restores every layer replaced so far and raises the original error. On a module dispatched
    by accelerate the hook stays and calls the replacement, so device moves and offloaded weights keep working.
    """
    tokens = TokenContext()
    saved: list[tuple[nn.Module, str, Any]] = []
    handle = model.register_forward_pre_hook(tokens.hook, with_kwargs=True)
    try:
        for ffn in ffns:
            slot = _forward_slot(ffn.module)
            previous = ffn.module.__dict__.get(slot)
            setattr(ffn.module, slot, make_forward(ffn, tokens))
            saved.append((ffn.module, slot, previous))
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
    """Sparsify `spec.target` of every FFN (or of `layers`) under any rule of the registry while the block runs.

    Yields a `SparsityStats` that fills as the model runs; the model is restored on exit. A method rule's
    data that the model alone gives (WINA's column norms, top_p_outlier's default m) is resolved here; a
    predictor must come fitted (`actsparse.methods.point_spec`).
    """
    if isinstance(spec, SparsitySpec) and get_rule(spec.rule).method and spec.data is None:
        spec = resolve(MODEL_DATA)(model, spec)

    def make_forward(ffn: FFN, tokens: TokenContext, stats: SparsityStats) -> Callable[..., torch.Tensor]:
        return partial(ffn.adapter.forward, ffn.module, RuleSite(spec, ffn.layer, tokens, stats))

    with instrumented(model, spec, layers, make_forward) as stats:
        yield stats


class FiniteCheck:
    """A site that changes nothing and raises on NaN or ±Inf in any vector: the dense run's version of
    the check every rule makes, so that a poisoned model cannot give a dense baseline."""

    def __init__(self, layer: int):
        self.layer = layer

    def __call__(
        self, vector: str, v: torch.Tensor, expert: int | None = None, token_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not bool(torch.isfinite(v).all()):
            raise non_finite(vector, self.layer, expert)
        return v


@contextmanager
def finite_checked(model: nn.Module) -> Iterator[None]:
    """Run `model` dense, raising `NonFiniteActivationError` (naming layer and vector) on NaN or ±Inf in
    any FFN activation; the model is restored on exit."""

    def make_forward(ffn: FFN, tokens: TokenContext) -> Callable[..., torch.Tensor]:
        return partial(ffn.adapter.forward, ffn.module, FiniteCheck(ffn.layer))

    with replaced_forwards(model, find_ffns(model), make_forward):
        yield


_ACTIVE: weakref.WeakKeyDictionary[nn.Module, list[tuple[SparsityStats, TokenContext]]] = weakref.WeakKeyDictionary()


def active_stats(model: nn.Module) -> list[SparsityStats]:
    """The statistics of the `sparsify` blocks now running on `model` (for scorers that count per step)."""
    return [stats for stats, _ in _ACTIVE.get(model, ())]


def set_real_tokens(model: nn.Module, real: torch.Tensor | None) -> None:
    """Tell the running `sparsify` blocks which tokens are real ([B, T] bool; None: every token), for a
    scorer that calls a model's submodules directly or passes a mask the pre-hook cannot read."""
    for _, tokens in _ACTIVE.get(model, ()):
        tokens.real, tokens.phase, tokens.unknown = (None if real is None else real.bool()), "prefill", None


def announce_decode(model: nn.Module) -> None:
    """Tell the running `sparsify` blocks that the next FFN calls are a decode step of real tokens only,
    for a decoder that runs the model's layers itself (`actsparse.speed.decoding`) instead of its forward."""
    for _, tokens in _ACTIVE.get(model, ()):
        tokens.real, tokens.unknown = None, None
        tokens.phase = "prefill" if tokens.prefill_only else "decode"


@contextmanager
def counted_as_prefill(model: nn.Module) -> Iterator[None]:
    """Count the block's forwards of `model` as prefill, one-token forwards over a cache included: a
    scorer's continuation chunks are prefill of the text it scores, not generated tokens."""
    contexts = [tokens for _, tokens in _ACTIVE.get(model, ())]
    for tokens in contexts:
        tokens.prefill_only = True
    try:
        yield
    finally:
        for tokens in contexts:
            tokens.prefill_only = False
