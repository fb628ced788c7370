"""`accelerate(model, spec)`: `sparsify` whose decode steps skip the weights of zeroed activations.

Prefill runs the `sparsify` simulation unchanged. In decode (one new token per sequence, at most
`MAX_SPARSE_BATCH` sequences) each gated FFN runs sparse kernels: the rule keeps the same entries as
in `sparsify` and they are counted the same way, but no zeroed copy is made: the products read only
the weight rows of the entries kept. One float32 CPU token under the threshold rule on `input`,
`intermediate` or `all_inputs` takes the fused C kernel (`kernels.sparse_ffn_cpu`, one call per
FFN) when it compiled; everything else takes the PyTorch kernels of `kernels.sparse_ffn`. The
transposed weight copies are made once on entry (so weights changed inside the block are not seen)
and dropped on exit. FFNs without single gated weights (packed MoE experts) keep the simulation.
On CUDA, decode under the threshold rule never waits for the GPU: NaN or Inf in a decode activation
raises at the block's exit instead of at the step (on CPU, at the step). The other rules wait once per
vector and step: top_p's Triton kernel reads its NaN/Inf flag back, top_k and max_p read `check_finite`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from actsparse.adapters import FFN
from actsparse.adapters.base import GatedWeights
from actsparse.instrument import RuleSite, TokenContext, count_entries, instrumented, non_finite
from actsparse.kernels import sparse_ffn_cpu
from actsparse.kernels.sparse_ffn import SparseFFNWeights, layout, sparse_ffn
from actsparse.kernels.sparse_ffn_cpu import FusedFFN
from actsparse.rules import RULES
from actsparse.spec import SparsitySpec
from actsparse.stats import SparsityStats

__all__ = ["MAX_SPARSE_BATCH", "DecodeStep", "accelerate"]

MAX_SPARSE_BATCH = 8
"""Decode batches up to this size share one union mask; larger ones run the simulation."""


def _below_or_equal(tau: float, dtype: torch.dtype) -> torch.Tensor:
    """The largest value of `dtype` ≤ τ, so that `a > it` in `dtype` equals `a.double() > τ` (τ ≥ 0)."""
    t = torch.tensor(tau, dtype=torch.float64).to(dtype)
    if float(t) > tau:  # rounded up: step down one unit in the last place (t > 0)
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        t = (t.view(bits) - 1).view(dtype)
    return t


class _DecodeMasks:
    """Keep-masks of the spec's rule for decode tokens, counted exactly as `sparsify`'s `RuleSite` does.

    The threshold rule, the one sparse kernels are for, takes a short path (τ was validated by the
    spec and is compared in the activation's dtype); the other rules call `actsparse.rules`.
    """

    def __init__(self, spec: SparsitySpec, layer: int, tokens: TokenContext, stats: SparsityStats):
        self.spec, self.layer, self.tokens, self.stats = spec, layer, tokens, stats
        self.mask_fn = RULES[spec.rule]
        self._cache: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        self._real_seen: torch.Tensor | None = None
        self._one_real = True
        self._non_finite: dict[str, torch.Tensor] = {}  # CUDA: per vector, whether NaN/Inf was seen

    def _tau(self, vector: str, v: torch.Tensor) -> torch.Tensor:
        """τ of the threshold rule in v's dtype and device, made once per (vector, dtype, device)."""
        key = (vector, v.dtype, v.device)
        if key not in self._cache:
            self._cache[key] = _below_or_equal(self.spec.value_for(self.layer, vector), v.dtype).to(v.device)
        return self._cache[key]

    def __call__(self, vector: str, v: torch.Tensor) -> torch.Tensor | None:
        if vector not in self.spec.vectors:
            return None
        a = v.abs()
        if v.is_cuda:  # no host sync here: the check is read at the end of the `accelerate` block (the
            # threshold rule then runs without one; the other rules' mask functions sync on their own)
            seen = ~torch.isfinite(a.amax())
            self._non_finite[vector] = seen | self._non_finite[vector] if vector in self._non_finite else seen
        elif not math.isfinite(float(a.max())):
            raise non_finite(vector, self.layer)
        threshold = self.spec.rule == "threshold"  # `a > tau` equals rules.threshold_mask's a.double() > τ
        keep = a > self._tau(vector, v) if threshold else self.mask_fn(v, self.spec.value_for(self.layer, vector))
        counts = count_entries(v, keep, self.tokens.rows(v, None))
        self.stats.record((self.layer, vector, self.tokens.phase, None), counts)
        return keep

    def check(self) -> None:
        """Raise if a CUDA decode step saw NaN or Inf (the deferred check of `__call__`)."""
        for vector, seen in self._non_finite.items():
            if bool(seen):
                raise non_finite(vector, self.layer)
        self._non_finite.clear()

    def one_real_token(self) -> bool:
        """Whether the current forward is one token that counts (not padding)."""
        if self.tokens.unknown is not None:
            return False  # the PyTorch kernels' counting raises `PaddingUnknownError`
        real = self.tokens.real
        if real is not self._real_seen:
            self._real_seen, self._one_real = real, real is None or bool(real.all())
        return self._one_real

    def record_fused(self, fused: FusedFFN, bad: int) -> None:
        """Count a call of the fused kernel (its counts of input and intermediate), or raise on NaN/Inf."""
        for code, row, vector in ((1, 0, "input"), (2, 1, "intermediate")):
            if vector in self.spec.vectors:
                if bad & code:
                    raise non_finite(vector, self.layer)
                self.stats.record((self.layer, vector, self.tokens.phase, None), fused.counts[row])


def _fused(spec: SparsitySpec, layer: int, weights: GatedWeights) -> FusedFFN | None:
    """The fused C kernel of one FFN, when the rule, vectors, weights and activation allow it."""
    if spec.rule != "threshold" or not set(spec.vectors) <= {"input", "intermediate"}:
        return None
    if weights.gate.device.type != "cpu" or weights.gate.dtype != torch.float32 or not sparse_ffn_cpu.available():
        return None
    act = sparse_ffn_cpu.activation_code(weights.act)
    if act is None:
        return None
    both = layout(weights, True, True)
    assert both.gate_up_t is not None and both.down_t is not None
    tau = {vector: spec.value_for(layer, vector) for vector in spec.vectors}
    biases = (weights.gate_bias, weights.up_bias, weights.down_bias)
    return FusedFFN(both.gate_up_t, both.down_t, act, tau.get("input"), tau.get("intermediate"), biases)


class DecodeStep:
    """The decode step of one gated FFN under `accelerate`: its fused C kernel or the PyTorch kernels.

    `step(x)` takes decode tokens x [..., h] (at most `MAX_SPARSE_BATCH`), applies the rule and counts
    into `stats` exactly as `sparsify` does; weights are laid out once, here.
    """

    def __init__(
        self, spec: SparsitySpec, layer: int, weights: GatedWeights, tokens: TokenContext, stats: SparsityStats
    ):
        self.masks = _DecodeMasks(spec, layer, tokens, stats)
        self.fused = _fused(spec, layer, weights)
        vectors = set(spec.vectors)
        sparse_input, sparse_intermediate = "input" in vectors, bool({"gate", "up", "intermediate"} & vectors)
        if self.fused is None:
            self.weights = layout(weights, sparse_input, sparse_intermediate)
        else:  # the PyTorch kernels share the fused kernel's copies
            gate_up_t, down_t = self.fused.weights
            self.weights = SparseFFNWeights(
                gate_up_t if sparse_input else None, down_t if sparse_intermediate else None, weights
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if self.fused is not None and rows == 1 and x.dtype == torch.float32 and self.masks.one_real_token():
            y, bad = self.fused(x)
            self.masks.record_fused(self.fused, bad)
            return y
        y = sparse_ffn(x.reshape(rows, x.shape[-1]), self.weights, self.masks)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _decode_forward(
    ffn: FFN, step: DecodeStep, site: RuleSite, tokens: TokenContext, *args: torch.Tensor
) -> torch.Tensor:
    (x,) = args
    if tokens.phase != "decode" or x.shape[:-1].numel() > MAX_SPARSE_BATCH:
        return ffn.adapter.forward(ffn.module, site, x)
    return step(x)


@contextmanager
def accelerate(model: nn.Module, spec: SparsitySpec, layers: list[int] | None = None) -> Iterator[SparsityStats]:
    """Like `sparsify(model, spec, layers)`, with sparse kernels in decode; restores the model on exit."""
    steps: list[DecodeStep] = []

    def make_forward(ffn: FFN, tokens: TokenContext, stats: SparsityStats) -> Callable[..., torch.Tensor]:
        site = RuleSite(spec, ffn.layer, tokens, stats)
        weights = ffn.adapter.gated_weights(ffn.module)
        if weights is None:
            return partial(ffn.adapter.forward, ffn.module, site)
        steps.append(DecodeStep(spec, ffn.layer, weights, tokens, stats))
        return partial(_decode_forward, ffn, steps[-1], site, tokens)

    try:
        with instrumented(model, spec, layers, make_forward) as stats:
            yield stats
            for step in steps:
                step.masks.check()
    finally:
        steps.clear()  # drop the weight copies
