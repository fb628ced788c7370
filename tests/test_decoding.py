"""`StaticDecoder` against transformers, its C attention and LM-head kernels, and the CPU kernels' thread pool."""

from __future__ import annotations

import multiprocessing

import pytest
import torch
from tiny import tiny_model

from actsparse import SparsitySpec, accelerate, sparsify
from actsparse.speed.decoding import StaticDecoder, UnsupportedModelError
from actsparse.speed.kernels import attention_cpu, sparse_ffn_cpu
from actsparse.speed.kernels.attention_cpu import AttentionStep

FAMILIES = ["llama", "mistral", "qwen2"]
needs_kernel = pytest.mark.skipif(not attention_cpu.available(), reason="needs a C compiler")


def prompts(batch: int = 1, length: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own greedy decode: (tokens [batch, steps], logits [steps, batch, vocab])."""
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits)


def decode(decoder: StaticDecoder, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, logits = [decoder.prefill(ids, steps)], [decoder.logits]
    for _ in range(steps - 1):
        tokens.append(decoder.step(tokens[-1]))
        logits.append(decoder.logits)
    return torch.cat(tokens, dim=1), torch.stack(logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_pytorch_path_is_transformers_bit_for_bit(family):
    model = tiny_model(family)
    for batch in (1, 3):
        ids = prompts(batch)
        ref_tokens, ref_logits = hf_greedy(model, ids, 8)
        decoder = StaticDecoder(model, kernel=False)
        assert not decoder.kernel
        tokens, logits = decode(decoder, ids, 8)
        assert torch.equal(tokens, ref_tokens) and torch.equal(logits, ref_logits)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_kernel_path_matches_transformers(family, dtype):
    model = tiny_model(family, dtype=dtype)
    ids = prompts(3)
    ref_tokens, ref_logits = hf_greedy(model, ids, 8)
    decoder = StaticDecoder(model)
    assert decoder.kernel
    before = AttentionStep.calls
    tokens, logits = decode(decoder, ids, 8)
    assert AttentionStep.calls - before == 7 * len(model.model.layers)  # every decode step, every layer
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for step in range(8):
        a, b = logits[step].double(), ref_logits[step].double()
        assert float((a - b).norm() / b.norm()) < tol, f"step {step}"
    if dtype == torch.float32:
        assert torch.equal(tokens, ref_tokens)


def test_generate_stops_at_eos_and_checks_its_input():
    model = tiny_model("llama")
    decoder = StaticDecoder(model, kernel=False)
    ids = prompts()
    first = decoder.generate(ids, 6)
    assert first.shape == (1, 6)
    stopped = decoder.generate(ids, 6, eos_token_id=int(first[0, 2]))
    assert torch.equal(stopped, first[:, : stopped.shape[1]]) and stopped.shape[1] <= 3
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.prefill(ids, 0)
    with pytest.raises(ValueError, match="batch"):
        decoder.prefill(prompts(9), 2)
    decoder.prefill(ids, 1)
    decoder.step(torch.tensor([[5]]))
    with pytest.raises(RuntimeError, match="no room"):
        decoder.step(torch.tensor([[5]]))


@pytest.mark.parametrize("family", ["gemma3_text", "phi3", "qwen3"])
def test_other_layouts_are_refused_before_any_work(family):
    with pytest.raises(UnsupportedModelError):
        StaticDecoder(tiny_model(family))


def test_a_sliding_window_is_refused_when_the_positions_exceed_it():
    model = tiny_model("mistral")
    model.config.sliding_window = 8
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        StaticDecoder(model).prefill(prompts(length=6), 4)


@pytest.mark.parametrize("kernel", [False, pytest.param(None, marks=needs_kernel)])
def test_decode_under_accelerate_counts_as_under_generate(kernel):
    """The FFNs stay the model's: `accelerate` and `sparsify` see decode steps as under `model.generate`."""
    model = tiny_model("llama")
    spec = SparsitySpec("all_inputs", "top_k", 0.5)  # a count per token: the same counts on either path
    ids = prompts(1)
    with torch.no_grad(), sparsify(model, spec) as ref:
        ref_tokens, _ = hf_greedy(model, ids, 6)
    for block in (sparsify, accelerate):
        with block(model, spec) as stats:
            tokens, _ = decode(StaticDecoder(model, kernel=kernel), ids, 6)
        assert stats.counts() == ref.counts(), block.__name__
        assert torch.equal(tokens, ref_tokens)
    ids = prompts(2)  # a batch: both blocks count its decode tokens alike
    counts = []
    for block in (sparsify, accelerate):
        with block(model, spec) as stats:
            decode(StaticDecoder(model, kernel=kernel), ids, 4)
        counts.append(stats.counts())
        assert stats.overall("decode") == 0.5
    assert counts[0] == counts[1]


def _attention_inputs(batch: int, dtype: torch.dtype, bias: bool):
    torch.manual_seed(1)
    hidden, heads, kv, d = 48, 6, 2, 8
    weights = tuple(torch.randn(shape, dtype=dtype) * 0.3 for shape in ((48, 48), (16, 48), (16, 48), (48, 48)))
    biases = tuple(torch.randn(w.shape[0], dtype=dtype) if bias and i < 3 else None for i, w in enumerate(weights))
    norms = (torch.rand(hidden, dtype=dtype) + 0.5, 1e-6, torch.rand(hidden, dtype=dtype) + 0.5, 1e-5)
    step = AttentionStep(weights, biases, norms, heads, kv, d, d**-0.5)
    h, add = torch.randn(batch, hidden, dtype=dtype), torch.randn(batch, hidden, dtype=dtype)
    angle = torch.rand(batch, d // 2) * 3
    cos, sin = torch.cat([angle.cos()] * 2, -1).to(dtype), torch.cat([angle.sin()] * 2, -1).to(dtype)
    cache = (torch.randn(batch, kv, 10, d, dtype=dtype), torch.randn(batch, kv, 10, d, dtype=dtype))
    return step, (weights, biases, norms, heads, kv, d), (h, add, cos, sin, cache)


def _attention_reference(params, inputs, pos: int):
    (wq, wk, wv, wo), biases, (n1, e1, n2, e2), heads, kv, d = params
    h, add, cos, sin = (t.double() for t in inputs[:4])
    keys, values = inputs[4][0].double().clone(), inputs[4][1].double().clone()
    b = [None if x is None else x.double() for x in biases]

    def norm(x, w, eps):
        return w.double() * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rope(x):
        half = d // 2
        return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), -1) * sin[:, None]

    res = h + add
    x = norm(res, n1, e1)
    lin = torch.nn.functional.linear
    q = rope(lin(x, wq.double(), b[0]).view(-1, heads, d))
    k = rope(lin(x, wk.double(), b[1]).view(-1, kv, d))
    keys[:, :, pos], values[:, :, pos] = k, lin(x, wv.double(), b[2]).view(-1, kv, d)
    group = heads // kv
    scores = torch.einsum("bhd,bhtd->bht", q, keys[:, :, : pos + 1].repeat_interleave(group, 1)) * d**-0.5
    att = torch.einsum("bht,bhtd->bhd", scores.softmax(-1), values[:, :, : pos + 1].repeat_interleave(group, 1))
    out = res + lin(att.reshape(len(h), -1), wo.double())
    return out, norm(out, n2, e2), keys, values


@needs_kernel
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_kernel_is_the_attention_block(dtype, bias, threads):
    pos = 6
    results = {}
    for n in (1, 2, 3):
        threads(n)
        step, params, inputs = _attention_inputs(3, dtype, bias)
        out = (torch.empty_like(inputs[0]), torch.empty_like(inputs[0]))
        step(*inputs[:4], inputs[4], pos, out)
        results[n] = (*out, *inputs[4])
    for n in (2, 3):  # whole rows per thread: the same bits at any thread count
        assert all(torch.equal(a, b) for a, b in zip(results[1], results[n], strict=True))
    ref = _attention_reference(params, inputs, pos)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got, want in zip(results[1], ref, strict=True):
        assert float((got.double() - want).norm() / want.norm()) < tol


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_kernel_is_f_linear(dtype, threads):
    torch.manual_seed(0)
    w, x, b = torch.randn(203, 70, dtype=dtype), torch.randn(5, 70, dtype=dtype), torch.randn(203, dtype=dtype)
    threads(1)
    one = attention_cpu.linear(x, w, b)
    threads(2)
    two = attention_cpu.linear(x, w, b)
    assert torch.equal(one, two)
    want = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert float((one.double() - want).norm() / want.norm()) < (1e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="tokens"):
        attention_cpu.linear(torch.randn(9, 70, dtype=dtype), w)


def _ffn_output(threads: int) -> torch.Tensor:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ffn = sparse_ffn_cpu.FusedFFN(torch.randn(32, 96), torch.randn(32, 96), torch.randn(96, 32), 0, 0.5, 0.3)
    return ffn(torch.randn(2, 32))[0]


@pytest.mark.skipif(not sparse_ffn_cpu.available(), reason="needs a C compiler")
def test_kernels_give_the_same_bits_on_the_pool_on_openmp_and_in_a_forked_child(threads):
    pooled = _ffn_output(2)
    lib = sparse_ffn_cpu._library()
    from actsparse.speed.kernels import cpu_pool

    lib.actsparse_set_pool(None)  # OpenMP regions
    try:
        assert torch.equal(_ffn_output(2), pooled)
    finally:
        cpu_pool.attach(lib)
    context = multiprocessing.get_context("fork")  # the child has none of the pool's threads: they are remade
    with context.Pool(1) as child:
        assert torch.equal(child.apply(_ffn_output, (2,)), pooled)
    assert torch.equal(_ffn_output(1), pooled)


def test_bench_decode_times_both_loops_and_keeps_the_best_dense(monkeypatch):
    """`actsparse bench --ops decode` on a tiny model: a row per rule, its dense the best of both loops'."""
    import argparse

    from tiny import tiny_lm

    from actsparse.cli import bench
    from actsparse.models import loading

    model, tokenizer = tiny_lm("llama")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (model, tokenizer))
    args = argparse.Namespace(rules="threshold,top_k", decoder="auto", repeats=1, decode_tokens=3, model="tiny")
    records = bench.bench_decode([0.5], "cpu", torch.float32, args)
    assert [r["shape"] for r in records] == ["tiny threshold (static)", "tiny top_k (static)"]
    for r in records:
        dense = [r[f"{loop}_{key}_us"] for loop in ("generate", "static") for key in ("dense_torch", "dense_kernel")]
        assert r["dense_us"] == round(min(dense), 2) and r["decoder"] == "static"
        assert 0.0 < r["measured_sparsity"] < 1.0
    assert records[1]["measured_sparsity"] == 0.5
    assert ("attention-c" in records[0]["kernel"]) == attention_cpu.available()
