"""The int8 weight format and the kernels that read it, against float64 references on the dequantised weights."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_decoding import _attention_reference, decode, prompts
from test_sparse_ffn import ACTS, between, gated, rel_err
from tiny import tiny_model
from torch.nn import functional as F

from actsparse import SparsitySpec, accelerate
from actsparse.speed.decoding import StaticDecoder
from actsparse.speed.kernels import attention_cpu, sparse_ffn_cpu
from actsparse.speed.kernels.attention_cpu import AttentionStep
from actsparse.speed.kernels.int8 import BLOCK, Q8, quantize

needs_c = pytest.mark.skipif(
    not (sparse_ffn_cpu.available() and attention_cpu.available()), reason="no C compiler for the kernels"
)


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_quantize_is_q8_0_blocks_along_the_rows():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 96, generator=gen)
    w[1, 32:64] = 0.0  # an all-zero block
    w[2, 5] = 40.0  # an outlier spoils only its own block
    q = quantize(w)
    assert q.q.dtype == torch.int8 and q.scale.shape == (5, 3) and q.shape == w.shape
    blocks = w.view(5, 3, BLOCK)
    assert torch.allclose(q.scale, blocks.abs().amax(-1) / 127)
    assert int(q.q.abs().view(5, 3, BLOCK).amax(-1)[q.scale > 0].min()) == 127  # each block's max maps to ±127
    err = (q.dequantize() - w).abs().view(5, 3, BLOCK)
    assert bool((err <= q.scale.unsqueeze(-1) / 2 + 1e-7).all())  # round to nearest
    assert bool((q.q[1, 32:64] == 0).all()) and float(q.scale[1, 1]) == 0.0
    assert float(q.scale[2, 1]) < 0.1 < float(q.scale[2, 0])
    assert torch.equal(
        quantize(torch.tensor([[0.5, -0.5] * 16]) * 127).q[0, :2], torch.tensor([127, -127]).to(torch.int8)
    )
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(torch.ones(4, 33))


def int8_ffn(gen: torch.Generator, h: int, d: int, bias: bool):
    """A random gated FFN, its weights transposed in the int8 format, and the dequantised float64 weights."""
    gate, up = torch.randn(d, h, generator=gen) / h**0.5, torch.randn(d, h, generator=gen) / h**0.5
    down = torch.randn(h, d, generator=gen) / d**0.5
    biases = tuple(torch.randn(n, generator=gen) for n in (d, d, h)) if bias else (None, None, None)
    q8 = tuple(quantize(w.t()) for w in (gate, up, down))
    return q8, tuple(q.dequantize(torch.float64).t() for q in q8), biases


def keep_of(v: torch.Tensor, rule: tuple[str, float] | None) -> torch.Tensor:
    """The reference mask of a vector (float64) under (rule, value), or all kept."""
    if rule is None:
        return torch.ones_like(v, dtype=torch.bool)
    name, value = rule
    if name == "threshold":
        return v.abs() > value
    keep = torch.zeros_like(v, dtype=torch.bool)
    return keep.scatter(-1, v.abs().topk(int(value), dim=-1).indices, True)


@needs_c
@settings(max_examples=25, deadline=None)
@given(
    blocks=st.tuples(st.integers(1, 4), st.integers(1, 6)),
    batch=st.integers(1, 3),
    rule=st.sampled_from(["threshold", "top_k"]),
    s_in=st.sampled_from([None, 0.0, 0.5, 0.9]),
    s_mid=st.sampled_from([None, 0.3, 0.7]),
    act=st.sampled_from([0, 1]),
    bias=st.booleans(),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_int8_kernel_matches_float64_on_the_dequantised_weights(
    blocks, batch, rule, s_in, s_mid, act, bias, threads, seed
):
    h, d = blocks[0] * BLOCK, blocks[1] * BLOCK
    gen = torch.Generator().manual_seed(seed)
    q8, (gate, up, down), biases = int8_ffn(gen, h, d, bias)
    x = torch.randn(batch, h, generator=gen)
    b64 = [None if b is None else b.double() for b in biases]

    def rule_for(v: torch.Tensor, s: float | None) -> tuple[str, float] | None:
        if s is None:
            return None
        if rule == "threshold":
            return ("threshold", between(v.abs(), s))
        return ("top_k", max(1, int(v.shape[-1] * (1 - s))))

    in_rule = rule_for(x[:1], s_in) if batch == 1 or rule == "top_k" else None  # a τ from one token
    xm = torch.where(keep_of(x.double(), in_rule), x.double(), 0)
    i = ACTS[act](F.linear(xm, gate, b64[0])) * F.linear(xm, up, b64[1])
    mid_rule = rule_for(i[:1], s_mid) if batch == 1 or rule == "top_k" else None
    ref = F.linear(torch.where(keep_of(i, mid_rule), i, 0), down, b64[2])
    fused = sparse_ffn_cpu.FusedFFN(*q8, act, in_rule, mid_rule, biases)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, bad = fused(x)
    finally:
        torch.set_num_threads(previous)
    assert bad == 0 and y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5


@needs_c
@pytest.mark.parametrize("rule, batch", [("threshold", 1), ("top_k", 1), ("top_p", 1), ("threshold", 4), ("top_k", 8)])
def test_fused_int8_kernel_is_bitwise_independent_of_the_thread_count(rule, batch, threads):
    gen = torch.Generator().manual_seed(0)
    h, d = 576, 1536  # SmolLM2's FFN
    w = gated(gen, h, d, torch.float32, bias=False)
    q8 = tuple(quantize(m.t()) for m in (w.gate, w.up, w.down))
    x = torch.randn(batch, h, generator=gen)
    values = {"threshold": (float(x.abs().median()), 0.05), "top_k": (h // 2, d // 2), "top_p": (0.7, 0.8)}[rule]
    kernel = sparse_ffn_cpu.FusedFFN(*q8, 0, *((rule, v) for v in values))
    outputs = []
    for n in (1, 2, 3):
        threads(n)
        outputs.append(kernel(x)[0])
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@needs_c
def test_fused_int8_kernel_checks_its_weights():
    q = quantize(torch.ones(64, 32))
    with pytest.raises(ValueError, match="int8 format, or none"):
        sparse_ffn_cpu.FusedFFN(q, q, torch.ones(32, 64), 0, None, None)
    with pytest.raises(ValueError, match="float32"):
        sparse_ffn_cpu.FusedFFN(q, q, quantize(torch.ones(32, 64)), 0, None, None, dtype=torch.float16)


@needs_c
@pytest.mark.parametrize("bias", [False, True])
def test_int8_attention_kernel_matches_float64_on_the_dequantised_weights(bias, threads):
    torch.manual_seed(1)
    hidden, heads, kv, d, pos, batch = 64, 8, 2, 8, 6, 3
    weights = tuple(torch.randn(shape) * 0.3 for shape in ((64, 64), (16, 64), (16, 64), (64, 64)))
    q8 = tuple(quantize(w) for w in weights)
    biases = tuple(torch.randn(w.shape[0]) if bias and i < 3 else None for i, w in enumerate(weights))
    norms = (torch.rand(hidden) + 0.5, 1e-6, torch.rand(hidden) + 0.5, 1e-5)
    h, add = torch.randn(batch, hidden), torch.randn(batch, hidden)
    angle = torch.rand(batch, d // 2) * 3
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    cache = (torch.randn(batch, kv, 10, d), torch.randn(batch, kv, 10, d))
    results = {}
    for n in (1, 2, 3):
        threads(n)
        step = AttentionStep(q8, biases, norms, heads, kv, d, d**-0.5)
        out, own = (torch.empty_like(h), torch.empty_like(h)), (cache[0].clone(), cache[1].clone())
        step(h, add, cos, sin, own, pos, out)
        results[n] = (*out, *own)
    for n in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(results[1], results[n], strict=True))
    params = (tuple(q.dequantize(torch.float64) for q in q8), biases, norms, heads, kv, d)
    ref = _attention_reference(params, (h, add, cos, sin, cache), pos)
    for got, want in zip(results[1], ref, strict=True):
        assert float((got.double() - want).norm() / want.norm()) < 1e-5


@needs_c
def test_int8_linear_matches_float64_on_the_dequantised_weight(threads):
    torch.manual_seed(0)
    w, x, b = torch.randn(203, 96), torch.randn(5, 96), torch.randn(203)
    q = quantize(w)
    outs = []
    for n in (1, 2):
        threads(n)
        outs.append(attention_cpu.linear(x, q, b))
    assert torch.equal(outs[0], outs[1])
    ref = F.linear(x.double(), q.dequantize(torch.float64), b.double())
    assert rel_err(outs[0], ref) < 1e-6
    assert rel_err(outs[0], F.linear(x.double(), w.double(), b.double())) > 1e-4  # it does read int8 weights


def _linears(model):
    """Every matrix the int8 decode quantizes, and whether the kernel reads it transposed (the FFN's)."""
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield getattr(layer.self_attn, name), False
        for name in ("gate_proj", "up_proj", "down_proj"):
            yield getattr(layer.mlp, name), True
    yield model.lm_head, False


@needs_c
@pytest.mark.parametrize("rule", ["dense", "top_k"])
def test_int8_decode_is_the_dequantised_model_and_leaves_the_model_as_it_was(rule):
    """StaticDecoder(weights="int8") under accelerate(weights="int8"): every decode matrix int8, the prefill the
    model's own; the same logits as a float64 decode on the dequantised weights, and the model untouched."""
    model = tiny_model("llama")
    spec = SparsitySpec("all_inputs", "top_k", 0.5) if rule == "top_k" else None
    if spec is None:
        layers = range(len(model.model.layers))
        spec = SparsitySpec("all_inputs", "threshold", {i: {"input": 0.0, "intermediate": 0.0} for i in layers})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = prompts(2)
    with accelerate(model, spec, weights="int8"):
        tokens, logits = decode(StaticDecoder(model, weights="int8"), ids, 6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ref_model = copy.deepcopy(model).double()
    with accelerate(ref_model, spec) if rule == "top_k" else torch.no_grad():
        decoder = StaticDecoder(ref_model, kernel=False)
        ref_tokens, ref_logits = [decoder.prefill(ids, 6)], [decoder.logits]
        with torch.no_grad():  # the prefill on the float weights, as above; the decode steps on int8 ones
            for module, transposed in _linears(ref_model):
                w = module.weight
                w.copy_(
                    quantize(w.t()).dequantize(torch.float64).t()
                    if transposed
                    else quantize(w).dequantize(torch.float64)
                )
        for _ in range(5):
            ref_tokens.append(decoder.step(ref_tokens[-1]))
            ref_logits.append(decoder.logits)
    ref = torch.stack(ref_logits)
    assert float((logits.double() - ref).norm() / ref.norm()) < 1e-5
    assert torch.equal(tokens, torch.cat(ref_tokens, dim=1))


def test_int8_weights_are_checked_before_any_work():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="weights must be one of"):
        with accelerate(model, SparsitySpec("all_inputs", "top_k", 0.5), weights="int4"):
            pass
    with pytest.raises(ValueError, match="fused CPU kernel"):
        with accelerate(model, SparsitySpec("gate", "top_k", 0.5), weights="int8"):
            pass
    with pytest.raises(ValueError, match="weights must be one of"):
        StaticDecoder(model, weights="int4")
    assert isinstance(quantize(torch.ones(2, 32)), Q8)


@needs_c
@pytest.mark.slow
def test_bench_decode_with_int8_weights(tmp_path):
    """`actsparse bench --ops decode --weights int8` on SmolLM2: every row int8, dense the int8 kernels."""
    import json

    from actsparse.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench", "--ops", "decode", "--weights", "int8", "--sparsities", "0.5", "--repeats", "1"]
    assert main([*argv, "--decode-tokens", "2", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["shape"].split()[1] for r in records] == ["threshold", "top_k"]
    assert all(r["weights"] == "int8" and "dense_torch_us" not in r and r["decoder"] == "static" for r in records)
    assert all(r["kernel"] == "fused-c+attention-c" for r in records)
