"""`accelerate(model, spec)`: `sparsify` whose decode steps skip the weights of zeroed activations.

Prefill runs the `sparsify` simulation unchanged. In decode (one new token per sequence, at most
`MAX_SPARSE_BATCH` sequences) each gated FFN runs sparse kernels: the rule keeps the same entries as
in `sparsify` and they are counted the same way, but no zeroed copy is made: the products read only
the weight rows of the entries kept. Decode tokens of float32 or bfloat16 CPU FFNs under the threshold,
top-k or top-p rule on `input`, `intermediate` or `all_inputs` take the fused C kernel
(`kernels.sparse_ffn_cpu`, one call per FFN, up to `MAX_SPARSE_BATCH` tokens) when it compiled;
everything else takes the PyTorch kernels of `kernels.sparse_ffn`. The kernels read the weights
transposed, and no copy is made: on entry each weight the kernels read is re-laid out in its own
storage (`kernels.relayout`: same shape, transposed strides, so dense code still runs on it) and on
exit put back bit for bit. FFNs without single gated weights (packed MoE experts) keep the simulation.
On CUDA, decode under the threshold rule never waits for the GPU: NaN or Inf in a decode activation
raises at the block's exit instead of at the step (on CPU, at the step). The other rules wait once per
vector and step: top_p's Triton kernel reads its NaN/Inf flag back, top_k and max_p read `check_finite`'s.

`weights="int8"` runs the fused kernel on int8 copies of W_gᵀ, W_uᵀ and W_dᵀ (`kernels.int8`, blocks of 32
along the axis that sparsity does not skip), made once per FFN and kept while its weights stay unchanged;
the model's weights are neither re-laid out nor touched. It needs the fused kernel's rules and vectors (an
error at entry otherwise); decode tokens the kernel does not take (padding, more than `MAX_BATCH`) run the
`sparsify` simulation on the float weights.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial

import torch
from torch import nn

from actsparse.models.adapters import FFN
from actsparse.models.adapters.base import GatedWeights
from actsparse.sparsity.instrument import RuleSite, TokenContext, count_entries, instrumented, non_finite
from actsparse.sparsity.registry import RULES, get_rule
from actsparse.sparsity.spec import SparsitySpec
from actsparse.sparsity.stats import Key, SparsityStats
from actsparse.speed.kernels import sparse_ffn_cpu
from actsparse.speed.kernels.int8 import BLOCK, Q8, quantize
from actsparse.speed.kernels.relayout import transposed_in_place
from actsparse.speed.kernels.sparse_ffn import layout, rows_of, sparse_ffn
from actsparse.speed.kernels.sparse_ffn_cpu import FusedFFN

__all__ = ["MAX_SPARSE_BATCH", "WEIGHTS", "DecodeStep", "accelerate"]

WEIGHTS = ("float", "int8")
"""What the decode kernels read: the model's own weights, or int8 copies."""

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
    spec and is compared in the activation's dtype); the other rules call `actsparse.sparsity.rules`.
    """

    def __init__(self, spec: SparsitySpec, layer: int, tokens: TokenContext, stats: SparsityStats):
        self.spec, self.layer, self.tokens, self.stats = spec, layer, tokens, stats
        self.mask_fn = get_rule(spec.rule).mask_fn()
        self._cache: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        self._real_seen: torch.Tensor | None = None
        self._one_real = True
        self._non_finite: dict[str, torch.Tensor] = {}  # CUDA: per vector, whether NaN/Inf was seen
        self._deferring = False  # whether the fused kernel's running totals are registered with the stats

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

    def all_real(self) -> bool:
        """Whether every token of the current forward counts (none is padding)."""
        if self.tokens.unknown is not None:
            return False  # the PyTorch kernels' counting raises `PaddingUnknownError`
        real = self.tokens.real
        if real is not self._real_seen:
            self._real_seen, self._one_real = real, real is None or bool(real.all())
        return self._one_real

    def run_fused(self, fused: FusedFFN, x: torch.Tensor) -> torch.Tensor:
        """The fused kernel on decode tokens x, counted (its counts of input and intermediate), or raise on
        NaN/Inf. Unless a scorer checks counts per document, the kernel keeps running totals that the stats
        take when read: no bookkeeping per call."""
        deferred = self.stats.per_token is None
        if deferred and not self._deferring:
            self.stats.defer(partial(self._take, fused))
            self._deferring = True
        y, bad = fused(x, accumulate=deferred)
        for code, vector in ((1, "input"), (2, "intermediate")):
            if bad & code and vector in self.spec.vectors:
                raise non_finite(vector, self.layer)
        if not deferred:
            rows = x.shape[:-1].numel()
            for row, vector in enumerate(("input", "intermediate")):
                if vector in self.spec.vectors:
                    counts = fused.counts[0, row] if rows == 1 else fused.counts[:rows, row].sum(dim=0)
                    self.stats.record((self.layer, vector, "decode", None), counts)
        return y

    def _take(self, fused: FusedFFN) -> dict[Key, torch.Tensor]:
        """The decode counts the fused kernel has summed since the last call (`SparsityStats.defer`)."""
        totals = fused.totals.clone()
        fused.totals.zero_()
        vectors = [(row, v) for row, v in enumerate(("input", "intermediate")) if v in self.spec.vectors]
        return {(self.layer, v, "decode", None): totals[row] for row, v in vectors if totals[row, 2] > 0}


_FUSED_RULES = frozenset(name for name, rule in RULES.items() if "cpu_fused" in rule.kernels)
"""The rules the fused C kernel serves (the registry's word; `sparse_ffn_cpu.RULE_CODES` holds their codes)."""


def fusable(spec: SparsitySpec, weights: GatedWeights) -> bool:
    """Whether the fused C kernel can run this FFN's decode steps (rule, vectors, device, dtype, activation)."""
    if spec.rule not in _FUSED_RULES or not set(spec.vectors) <= {"input", "intermediate"}:
        return False
    if spec.rule == "top_p" and float(spec.value) >= 1.0:  # p = 1 keeps to the rules' own special case
        return False
    tensors = (weights.gate, weights.up, weights.down)
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.bfloat16) for t in tensors):
        return False
    return sparse_ffn_cpu.activation_code(weights.act) is not None and sparse_ffn_cpu.available()


_INT8: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], tuple[Q8, Q8, Q8]]] = weakref.WeakKeyDictionary()


def int8_rows(module: nn.Module, weights: GatedWeights) -> tuple[Q8, Q8, Q8]:
    """W_gᵀ, W_uᵀ, W_dᵀ of one FFN module in the int8 format: quantized once, again only after its weights
    changed (a new version or address)."""
    tensors = (weights.gate, weights.up, weights.down)
    key = tuple(t._version for t in tensors) + tuple(t.data_ptr() for t in tensors)
    if module not in _INT8 or _INT8[module][0] != key:
        gate_t, up_t, down_t = (quantize(w.detach().t()) for w in tensors)
        _INT8[module] = (key, (gate_t, up_t, down_t))
    return _INT8[module][1]


def int8_error(spec: SparsitySpec) -> str | None:
    """Why `weights="int8"` cannot run this spec (None when it can): it needs the fused kernel's rules."""
    if spec.rule not in _FUSED_RULES or not set(spec.vectors) <= {"input", "intermediate"}:
        return (
            f"weights='int8' runs the fused CPU kernel: rules {', '.join(sorted(_FUSED_RULES))} on input, "
            f"intermediate or all_inputs, not {spec.rule} on {spec.target}"
        )
    if spec.rule == "top_p" and float(spec.value) >= 1.0:
        return "weights='int8' runs top_p below p = 1"
    return None


def _fused(spec: SparsitySpec, layer: int, weights: GatedWeights, int8: tuple[Q8, Q8, Q8] | None = None) -> FusedFFN:
    """The fused C kernel of one FFN (`fusable`), reading the weights where they lie when re-laid out, or the
    int8 copies `int8` of them."""
    act = sparse_ffn_cpu.activation_code(weights.act)
    assert act is not None
    sizes = {"input": weights.gate.shape[1], "intermediate": weights.gate.shape[0]}
    rules: dict[str, float | tuple[str, float]] = {}
    for vector in spec.vectors:
        value = spec.value_for(layer, vector)
        rules[vector] = (spec.rule, max(1, int(sizes[vector] * value)) if spec.rule == "top_k" else value)
    biases = (weights.gate_bias, weights.up_bias, weights.down_bias)
    if int8 is not None:
        return FusedFFN(*int8, act, rules.get("input"), rules.get("intermediate"), biases, weights.down.dtype)
    gate_t, up_t, down_t = (rows_of(w) for w in (weights.gate, weights.up, weights.down))
    return FusedFFN(gate_t, up_t, down_t, act, rules.get("input"), rules.get("intermediate"), biases)


class DecodeStep:
    """The decode step of one gated FFN under `accelerate`: its fused C kernel or the PyTorch kernels.

    `step(x)` takes decode tokens x [..., h] (at most `MAX_SPARSE_BATCH`), applies the rule and counts
    into `stats` exactly as `sparsify` does. The kernels read views of `weights` when they are laid out
    transposed in place (`kernels.relayout`), copies otherwise; with `int8` (its int8 copies, see
    `int8_rows`) the fused kernel reads those, and `fallback` (the simulation) runs what it does not take.
    """

    def __init__(
        self,
        spec: SparsitySpec,
        layer: int,
        weights: GatedWeights,
        tokens: TokenContext,
        stats: SparsityStats,
        int8: tuple[Q8, Q8, Q8] | None = None,
        fallback: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.masks = _DecodeMasks(spec, layer, tokens, stats)
        self.fused = _fused(spec, layer, weights, int8) if fusable(spec, weights) else None
        vectors = set(spec.vectors)
        sparse_input, sparse_intermediate = "input" in vectors, bool({"gate", "up", "intermediate"} & vectors)
        self.fallback = fallback
        self.weights = None if int8 is not None else layout(weights, sparse_input, sparse_intermediate)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        fused = self.fused
        if fused is not None and rows <= sparse_ffn_cpu.MAX_BATCH and x.dtype == fused.dtype and self.masks.all_real():
            return self.masks.run_fused(fused, x)
        if self.weights is None:
            assert self.fallback is not None, "int8 weights need the simulation to fall back on"
            return self.fallback(x)
        y = sparse_ffn(x.reshape(rows, x.shape[-1]), self.weights, self.masks)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _decode_forward(
    ffn: FFN, step: DecodeStep, site: RuleSite, tokens: TokenContext, *args: torch.Tensor
) -> torch.Tensor:
    (x,) = args
    if tokens.phase != "decode" or x.shape[:-1].numel() > MAX_SPARSE_BATCH:
        return ffn.adapter.forward(ffn.module, site, x)
    return step(x)


def _parameters_of(module: nn.Module, tensors: list[torch.Tensor]) -> list[nn.Parameter]:
    """The module's parameters whose storage holds one of `tensors` (the whole weight behind a view)."""
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    return [p for p in module.parameters() if p.untyped_storage().data_ptr() in storages]


@contextmanager
def accelerate(
    model: nn.Module, spec: SparsitySpec, layers: list[int] | None = None, weights: str = "float"
) -> Iterator[SparsityStats]:
    """Like `sparsify(model, spec, layers)`, with sparse kernels in decode; restores the model on exit
    (its weights too: the same bits at the same addresses). `weights="int8"`: the kernels read int8 copies."""
    if isinstance(spec, SparsitySpec) and get_rule(spec.rule).method:
        rule = get_rule(spec.rule)
        raise ValueError(f"accelerate has no kernels for {rule.name}, whose mask reads {', '.join(rule.needs)}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
    if weights == "int8" and (reason := int8_error(spec)):
        raise ValueError(reason)
    steps: list[DecodeStep] = []
    relaid = ExitStack()

    def make_forward(ffn: FFN, tokens: TokenContext, stats: SparsityStats) -> Callable[..., torch.Tensor]:
        site = RuleSite(spec, ffn.layer, tokens, stats)
        gated = ffn.adapter.gated_weights(ffn.module)
        simulation = partial(ffn.adapter.forward, ffn.module, site)
        if gated is None:
            return simulation
        if weights == "int8":
            if not fusable(spec, gated) or gated.gate.shape[0] % BLOCK or gated.gate.shape[1] % BLOCK:
                raise ValueError(
                    f"weights='int8' runs the fused CPU kernel on float32 or bfloat16 CPU FFNs whose sizes are "
                    f"multiples of {BLOCK} (a C compiler present); layer {ffn.layer} is not one"
                )
            int8 = int8_rows(ffn.module, gated)
            steps.append(DecodeStep(spec, ffn.layer, gated, tokens, stats, int8, simulation))
            return partial(_decode_forward, ffn, steps[-1], site, tokens)
        vectors = set(spec.vectors)
        read: list[torch.Tensor] = []  # the matrices some kernel reads by rows
        if fusable(spec, gated) or "input" in vectors:
            read += [gated.gate, gated.up]
        if fusable(spec, gated) or {"gate", "up", "intermediate"} & vectors:
            read.append(gated.down)
        relaid.enter_context(transposed_in_place(_parameters_of(ffn.module, read)))
        gated = ffn.adapter.gated_weights(ffn.module)  # views of the re-laid parameters
        assert gated is not None
        steps.append(DecodeStep(spec, ffn.layer, gated, tokens, stats))
        return partial(_decode_forward, ffn, steps[-1], site, tokens)

    with relaid:  # exits last: the weights are put back after the forwards
        try:
            with instrumented(model, spec, layers, make_forward) as stats:
                yield stats
                for step in steps:
                    step.masks.check()
        finally:
            steps.clear()
