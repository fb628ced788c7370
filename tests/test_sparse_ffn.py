"""Sparse decode kernels against their dense references on random inputs."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from actsparse.models.adapters import GatedWeights
from actsparse.sparsity.rules import threshold_mask
from actsparse.speed.kernels import cbuild, gather_gemv_triton, sparse_ffn_cpu, sparse_ffn_triton
from actsparse.speed.kernels.sparse_ffn import (
    layout,
    masked_rows_matmul,
    masked_rows_matmul_reference,
    sparse_ffn,
    sparse_ffn_reference,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
TRITON_RUNS = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)
"""Triton kernels run on CUDA, or anywhere under the interpreter."""


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def random_case(gen: torch.Generator, batch: int, k: int, n: int, sparsity: float, dtype: torch.dtype):
    x = torch.randn(batch, k, generator=gen).to(dtype)
    keep = torch.rand(batch, k, generator=gen) >= sparsity
    weight_t = torch.randn(k, n, generator=gen).to(dtype)
    return x, keep, weight_t


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 8),
    k=st.integers(1, 300),
    n=st.integers(1, 200),
    sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_masked_rows_matmul_matches_dense(batch, k, n, sparsity, dtype, seed):
    x, keep, weight_t = random_case(torch.Generator().manual_seed(seed), batch, k, n, sparsity, dtype)
    ref = masked_rows_matmul_reference(x.double(), keep, weight_t.double())
    out = torch.full((batch, n), float("nan"), dtype=dtype)  # poisoned: every entry must be written
    y = masked_rows_matmul(x, keep, weight_t, out=out)
    assert y.data_ptr() == out.data_ptr() and y.shape == (batch, n)
    if ref.norm() == 0:
        assert bool((y == 0).all())
    else:  # error relative to the size of the products, not of their sum (which may cancel)
        scale = masked_rows_matmul_reference(x.double().abs(), keep, weight_t.double().abs())
        assert float((y.double() - ref).norm() / scale.norm()) < TOL[dtype]
    fresh = masked_rows_matmul(x, keep, weight_t)  # and without out, the same values
    assert torch.equal(fresh, y)


def test_masked_rows_matmul_reads_only_kept_rows():
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 4):
        x, keep, weight_t = random_case(gen, batch, 64, 32, 0.5, torch.float32)
        dropped = ~keep.any(dim=0)
        weight_t[dropped] = float("nan")  # a dropped row that were read would poison the result
        y = masked_rows_matmul(x, keep, weight_t)
        assert bool(torch.isfinite(y).all())
        clean = weight_t.nan_to_num(0.0)
        assert rel_err(y, masked_rows_matmul_reference(x.double(), keep, clean.double())) < 1e-5


def test_masked_rows_matmul_rejects_bad_shapes():
    with pytest.raises(ValueError, match="do not match"):
        masked_rows_matmul(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), torch.ones(4, 2))
    with pytest.raises(ValueError, match="dtypes differ"):
        masked_rows_matmul(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), torch.ones(3, 2, dtype=torch.bfloat16))


def gated(gen: torch.Generator, h: int, d: int, dtype: torch.dtype, bias: bool) -> GatedWeights:
    def rand(*shape):
        return (torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(dtype)

    biases = (rand(1, d)[0], rand(1, d)[0], rand(1, h)[0]) if bias else (None, None, None)
    return GatedWeights(rand(d, h), rand(d, h), rand(h, d), F.silu, *biases)


@pytest.mark.parametrize("target", ["input", "gate", "up", "intermediate", "all_inputs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_ffn_matches_simulation(target, dtype):
    vectors = ("input", "intermediate") if target == "all_inputs" else (target,)
    gen = torch.Generator().manual_seed(1)
    for batch, bias in ((1, False), (3, True), (1, True)):
        weights = gated(gen, 48, 96, dtype, bias)
        x = torch.randn(batch, 48, generator=gen).to(dtype)

        def keep(vector: str, v: torch.Tensor) -> torch.Tensor | None:
            return threshold_mask(v, 0.4 if vector == "input" else 0.05) if vector in vectors else None

        ref = sparse_ffn_reference(x, weights, keep)
        y = sparse_ffn(x, layout(weights, "input" in vectors, target != "input"), keep)
        assert y.shape == (batch, 48) and y.dtype == dtype
        assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.triton
@pytest.mark.skipif(not sparse_ffn_triton.available(), reason="triton is not installed")
@TRITON_RUNS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_kernel_matches_dense(dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(2)
    configs = [None, sparse_ffn_triton.GemvConfig(8, 64, 2, 4), sparse_ffn_triton.GemvConfig(32, 128, 16, 8)]
    cases = ((1, 200, 130, 0.5), (1, 37, 300, 0.0), (5, 150, 70, 0.7), (8, 64, 64, 1.0), (2, 700, 40, 0.3))
    for (batch, k, n, sparsity), config in itertools.product(cases, configs):
        for masked_inside in (False, True):  # x zeroed beforehand, or the kernel applies keep
            x, keep, weight_t = random_case(gen, batch, k, n, sparsity, dtype)  # fresh inputs per check
            xs = torch.where(keep, x, 0)
            ref = xs.double() @ weight_t.double()
            out = torch.full((batch, n), float("nan"), dtype=dtype, device=device)
            args = (x, keep.to(device)) if masked_inside else (xs, None)
            y = sparse_ffn_triton.sparse_rows_matmul(
                args[0].to(device), weight_t.to(device), out=out, config=config, keep=args[1]
            )
            assert y.data_ptr() == out.data_ptr()
            if ref.norm() == 0:
                assert bool((y == 0).all())
            else:
                assert rel_err(y.cpu(), ref) < TOL[dtype]


@pytest.mark.triton
@pytest.mark.skipif(not gather_gemv_triton.available(), reason="triton is not installed")
@TRITON_RUNS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gather_gemv_matches_dense_and_reads_only_kept_rows(dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    configs = [None, gather_gemv_triton.GatherConfig(8, 64, 2, 4)]
    cases = ((1, 200, 130, 0.5), (1, 37, 300, 0.0), (5, 150, 70, 0.7), (8, 64, 64, 1.0), (4, 1100, 40, 0.9))
    for (batch, k, n, sparsity), config in itertools.product(cases, configs):
        for masked_inside in (False, True):
            x, keep, weight_t = random_case(gen, batch, k, n, sparsity, dtype)
            xs = torch.where(keep, x, 0)
            ref = xs.double() @ weight_t.double()
            weight_t[~keep.any(dim=0)] = float("nan")  # a dropped row that were read would poison the result
            args = (x, keep.to(device)) if masked_inside else (xs, None)
            y = gather_gemv_triton.gather_rows_matmul(
                args[0].to(device), weight_t.to(device), keep=args[1], kept_fraction=1 - sparsity, config=config
            )
            assert bool(torch.isfinite(y).all())
            if ref.norm() == 0:
                assert bool((y == 0).all())
            else:
                assert rel_err(y.cpu(), ref) < TOL[dtype]


def test_bench_command_writes_records(tmp_path):
    import json

    from actsparse.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench", "--ops", "gemv,ffn", "--shapes", "64x32", "--ffn-shapes", "32x64", "--sparsities", "0,0.5"]
    assert main([*argv, "--repeats", "1", "--iters", "2", "--working-set", "0", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["op"], r["sparsity"]) for r in records] == [("gemv", 0.0), ("gemv", 0.5), ("ffn", 0.0), ("ffn", 0.5)]
    keys = {"device", "shape", "op", "sparsity", "dense_us", "sparse_us", "speedup", "limit"}
    assert all(keys <= set(r) and r["dense_us"] > 0 and r["sparse_us"] > 0 for r in records)
    assert records[1]["limit"] == 2.0


needs_c = pytest.mark.skipif(not sparse_ffn_cpu.available(), reason="no C compiler for the fused kernel")
ACTS = {0: F.silu, 1: lambda v: F.gelu(v, approximate="tanh")}


def between(a: torch.Tensor, s: float) -> float:
    """A threshold halfway between two neighbouring |values|, zeroing about a fraction s (no ties at τ)."""
    values = a.flatten().double().sort().values
    k = min(max(int(s * values.numel()), 1), values.numel() - 1)
    return float(values[k - 1] + values[k]) / 2


def intermediate(x, gate, up, act, tau_in, biases, dtype=torch.float64):
    """Input mask and intermediate vector of the masked FFN, computed in `dtype`."""
    keep_x = x.abs() > tau_in if tau_in is not None else torch.ones_like(x, dtype=torch.bool)
    xm = torch.where(keep_x, x, 0).to(dtype)
    bg, bu = (None if b is None else b.to(dtype) for b in biases[:2])
    return keep_x, ACTS[act](F.linear(xm, gate.to(dtype), bg)) * F.linear(xm, up.to(dtype), bu)


def fused_reference(x, gate, up, down, act, tau_in, tau_mid, biases):
    """The masked FFN in float64, and (zeroed, natural zeros, seen) of x and i."""
    keep_x, i = intermediate(x, gate, up, act, tau_in, biases)
    keep_i = i.abs() > tau_mid if tau_mid is not None else torch.ones_like(i, dtype=torch.bool)
    bd = None if biases[2] is None else biases[2].double()
    y = F.linear(torch.where(keep_i, i, 0), down.double(), bd)
    i32 = intermediate(x, gate, up, act, tau_in, biases, torch.float32)[1]  # natural zeros as float32 has them
    counts = [[int((~k).sum()), int((v == 0).sum()), v.numel()] for k, v in ((keep_x, x), (keep_i, i32))]
    return y, counts


@needs_c
@settings(max_examples=30, deadline=None)
@given(
    h=st.integers(2, 80),
    d=st.integers(2, 150),
    s_in=st.sampled_from([None, 0.0, 0.5, 0.9]),
    s_mid=st.sampled_from([None, 0.0, 0.3, 0.7]),
    act=st.sampled_from([0, 1]),
    bias=st.booleans(),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_kernel_matches_dense_reference(h, d, s_in, s_mid, act, bias, threads, seed):
    gen = torch.Generator().manual_seed(seed)  # fresh inputs for every check
    gate, up = torch.randn(d, h, generator=gen) / h**0.5, torch.randn(d, h, generator=gen) / h**0.5
    down = torch.randn(h, d, generator=gen) / d**0.5
    biases = tuple(torch.randn(n, generator=gen) for n in (d, d, h)) if bias else (None, None, None)
    x = torch.randn(1, 1, h, generator=gen)
    x[..., 0] = 0.0  # a natural zero
    tau_in = None if s_in is None else between(x.abs(), s_in)
    tau_mid = None if s_mid is None else between(intermediate(x, gate, up, act, tau_in, biases)[1].abs(), s_mid)
    fused = sparse_ffn_cpu.FusedFFN(gate.t(), up.t(), down.t(), act, tau_in, tau_mid, biases)
    ref, counts = fused_reference(x, gate, up, down, act, tau_in, tau_mid, biases)
    fused.counts.fill_(-1)
    out = torch.full_like(x, float("nan"))  # poisoned: every entry must be written
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, bad = fused(x, out=out)
    finally:
        torch.set_num_threads(previous)
    assert bad == 0 and y.data_ptr() == out.data_ptr()
    assert rel_err(y, ref) < 1e-5
    assert fused.counts[0].tolist() == counts


@needs_c
def test_fused_kernel_reads_only_kept_rows_and_flags_non_finite():
    gen = torch.Generator().manual_seed(5)
    h, d = 40, 70
    gate_up_t, down_t = torch.randn(h, 2 * d, generator=gen), torch.randn(d, h, generator=gen)
    gate_t, up_t = gate_up_t[:, :d], gate_up_t[:, d:]  # views with a row stride of 2d, as Phi-3's fused weight
    x = torch.randn(1, h, generator=gen)
    tau_in = between(x.abs(), 0.5)
    gate_up_t[x[0].abs() <= tau_in] = float("nan")  # a dropped row that were read would poison the output
    fused = sparse_ffn_cpu.FusedFFN(gate_t, up_t, down_t, 0, tau_in, None)
    assert fused.weights[0].data_ptr() == gate_up_t.data_ptr()  # no copy
    y, bad = fused(x)
    assert bad == 0 and bool(torch.isfinite(y).all())
    k = int((x[0].abs() > tau_in).sum())
    y, bad = sparse_ffn_cpu.FusedFFN(gate_t, up_t, down_t, 0, ("top_k", k), None)(x)  # the same rows by top-k
    assert bad == 0 and bool(torch.isfinite(y).all())
    tie = float(x[0].abs().max())  # threshold keeps |x| > τ: an entry equal to τ is dropped
    clean = gate_up_t.nan_to_num(0.0)
    fused = sparse_ffn_cpu.FusedFFN(clean[:, :d], clean[:, d:], down_t, 0, tie, None)
    y, bad = fused(x)
    assert bad == 0 and fused.counts[0].tolist() == [[h, 0, h], [0, d, d]] and bool((y == 0).all())
    x[0, 3] = float("inf")
    assert sparse_ffn_cpu.FusedFFN(gate_t, up_t, down_t, 0, None, 0.1)(x)[1] == 2  # dense input: i turns NaN
    assert sparse_ffn_cpu.FusedFFN(gate_t, up_t, down_t, 0, None, ("top_k", 3))(x)[1] == 2
    x[0, 3] = float("nan")
    assert sparse_ffn_cpu.FusedFFN(gate_t, up_t, down_t, 0, 0.0, 0.1)(x)[1] == 1
    assert sparse_ffn_cpu.FusedFFN(gate_t, up_t, down_t, 0, ("top_p", 0.5), None)(x)[1] == 1


def test_activation_codes_and_shape_checks():
    from transformers.activations import ACT2FN

    assert sparse_ffn_cpu.activation_code(ACT2FN["silu"]) == 0 == sparse_ffn_cpu.activation_code(F.silu)
    assert sparse_ffn_cpu.activation_code(ACT2FN["gelu_pytorch_tanh"]) == 1
    assert sparse_ffn_cpu.activation_code(torch.relu) is None
    with pytest.raises(ValueError, match="float32"):
        sparse_ffn_cpu.FusedFFN(
            torch.ones(3, 2, dtype=torch.bfloat16), torch.ones(3, 2), torch.ones(2, 3), 0, None, None
        )
    with pytest.raises(ValueError, match="gate_t"):
        sparse_ffn_cpu.FusedFFN(torch.ones(3, 5), torch.ones(3, 5), torch.ones(2, 3), 0, None, None)
    with pytest.raises(ValueError, match="no rule"):
        sparse_ffn_cpu.FusedFFN(torch.ones(3, 2), torch.ones(3, 2), torch.ones(2, 3), 0, ("max_p", 0.5), None)
    fused = sparse_ffn_cpu.FusedFFN(torch.ones(3, 2), torch.ones(3, 2), torch.ones(2, 3), 0, None, None)
    with pytest.raises(ValueError, match="1 to 8"):
        fused(torch.ones(9, 3))


def test_c_kernels_can_be_disabled(monkeypatch, tmp_path):
    monkeypatch.setattr(cbuild, "_loaded", {})
    monkeypatch.setenv("ACTSPARSE_NO_CKERNEL", "1")
    assert not sparse_ffn_cpu.available()
    monkeypatch.setattr(cbuild, "_loaded", {})
    monkeypatch.delenv("ACTSPARSE_NO_CKERNEL")
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path))
    assert cbuild.load("broken", "this is not C", lambda lib: None) is None  # a failed build falls back


@pytest.fixture
def threads():
    """Set torch's thread count for one test, restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


FUSED_CASES = [
    (True, "threshold", 1),
    (True, "top_k", 1),
    (True, "top_p", 1),
    (True, "threshold", 4),
    (True, "top_k", 8),
]


@pytest.mark.parametrize("fused, rule, batch", [*FUSED_CASES, (False, "threshold", 1)])
def test_one_token_decode_is_bitwise_independent_of_the_thread_count(fused, rule, batch, threads):
    """The sparse products of decode tokens sum in an order fixed by the shapes, not by the threads.

    Otherwise the output rounds differently at 1 and at 2 threads, and an entry of the next layer that lies
    within that rounding of τ is kept at one thread count and dropped at the other (issue 15).
    """
    if fused and not sparse_ffn_cpu.available():
        pytest.skip("no C compiler")
    gen = torch.Generator().manual_seed(0)
    h, d = 576, 1536  # SmolLM2's FFN
    w = gated(gen, h, d, torch.float32, bias=False)
    x = torch.randn(batch, h, generator=gen)
    tau_in, tau_mid = float(x.abs().median()), 0.05
    both = layout(w, True, True)
    if fused:
        values = {"threshold": (tau_in, tau_mid), "top_k": (h // 2, d // 2), "top_p": (0.7, 0.8)}[rule]
        rules = [(rule, v) for v in values]
        kernel = sparse_ffn_cpu.FusedFFN(both.gate_t, both.up_t, both.down_t, 0, *rules)
        run = lambda: kernel(x)[0]  # noqa: E731
    else:
        masks = {"input": tau_in, "intermediate": tau_mid}
        keep = lambda name, v: threshold_mask(v, masks[name]) if name in masks else None  # noqa: E731
        run = lambda: sparse_ffn(x, both, keep)  # noqa: E731
    outputs = []
    for n in (1, 2):
        threads(n)
        outputs.append(run())
    assert torch.equal(outputs[0], outputs[1])
