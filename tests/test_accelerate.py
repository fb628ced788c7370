"""`accelerate` against the `sparsify` simulation on tiny random models of the gated families."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from tiny import FAMILIES, MOE_FAMILIES, tiny_model

from actsparse import NonFiniteActivationError, SparsitySpec, accelerate, sparsify
from actsparse.sparsity.stats import TokenCounts
from actsparse.speed.accelerate import MAX_SPARSE_BATCH
from actsparse.speed.kernels import sparse_ffn_cpu
from actsparse.speed.kernels.sparse_ffn_cpu import FusedFFN

GATED = [f for f in FAMILIES if f not in MOE_FAMILIES]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
TAUS = {"input": 0.15, "gate": 0.05, "up": 0.1, "intermediate": 0.02}


def spec_for(rule: str, target: str = "all_inputs") -> SparsitySpec:
    if rule == "threshold":
        vectors = ("input", "intermediate") if target == "all_inputs" else (target,)
        return SparsitySpec(target, rule, {layer: {v: TAUS[v] * (1 + layer) for v in vectors} for layer in (0, 1)})
    return SparsitySpec(target, rule, {"top_p": 0.8, "top_k": 0.5, "max_p": 0.1}[rule])


def run_decode(model, ctx, steps: int = 3, batch: int = 2, seed: int = 0, device: str = "cpu"):
    """Logits of a left-padded prefill and `steps` teacher-forced decode steps, and the stats."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (batch, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[1:, :2] = 0  # left padding on the other rows
    forced = torch.randint(1, 97, (batch, steps), generator=gen)
    ids, mask, forced = ids.to(device), mask.to(device), forced.to(device)
    logits = []
    with torch.no_grad(), ctx as stats:
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        logits.append(out.logits[:, -1])
        for step in range(steps):
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
            out = model(
                input_ids=forced[:, step : step + 1],
                attention_mask=mask,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            logits.append(out.logits[:, -1])
    return torch.stack(logits), stats


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    for step in range(a.shape[0]):
        err = float((a[step].double() - b[step].double()).norm() / b[step].double().norm())
        assert err < tol, f"step {step}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", GATED)
def test_accelerate_matches_sparsify(family, dtype):
    model = tiny_model(family, dtype=dtype)
    spec = spec_for("top_p")
    for batch in (1, 3):
        ref, ref_stats = run_decode(model, sparsify(model, spec), batch=batch)
        fast, fast_stats = run_decode(model, accelerate(model, spec), batch=batch)
        assert_close(fast, ref, TOL[dtype])
        assert fast_stats.overall("decode") == fast_stats.overall("decode")  # decode steps were seen
        if dtype == torch.float32:  # same masks, so the same counts
            assert fast_stats.counts() == ref_stats.counts()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton decode kernels)")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["threshold", "top_p", "top_k"])
@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_accelerate_on_cuda_matches_sparsify(family, rule, dtype):
    model = tiny_model(family, dtype=dtype).to("cuda")
    for batch in (1, 3, 8):
        ref, _ = run_decode(model, sparsify(model, spec_for(rule)), batch=batch, device="cuda")
        fast, stats = run_decode(model, accelerate(model, spec_for(rule)), batch=batch, device="cuda")
        assert_close(fast, ref, 1e-2)
        assert 0.0 < stats.overall("decode") < 1.0


@needs_cuda
def test_cuda_nan_in_decode_raises_at_the_block_exit():
    model = tiny_model("llama", dtype=torch.bfloat16).to("cuda")
    ids = torch.randint(1, 97, (1, 4), device="cuda")
    mask = torch.ones(1, 5, dtype=torch.long, device="cuda")
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[0] = float("nan")
        out = model(ids, use_cache=True)
        with pytest.raises(NonFiniteActivationError, match="layer 1"), accelerate(model, spec_for("threshold")):
            model(ids[:, :1], attention_mask=mask, past_key_values=out.past_key_values)
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("rule", ["threshold", "top_p", "top_k", "max_p"])
@pytest.mark.parametrize("target", ["input", "gate", "up", "intermediate", "all_inputs"])
def test_rules_and_targets(rule, target):
    model = tiny_model("llama")
    spec = spec_for(rule, target)
    ref, ref_stats = run_decode(model, sparsify(model, spec), batch=1)
    fast, fast_stats = run_decode(model, accelerate(model, spec), batch=1)
    assert_close(fast, ref, 1e-5)
    assert fast_stats.counts() == ref_stats.counts()
    assert 0.0 < fast_stats.overall("decode") < 1.0


def test_large_batches_and_moe_fall_back_to_the_simulation():
    model = tiny_model("qwen2_moe")  # packed experts: simulated; shared expert: sparse kernels
    spec = spec_for("top_k")
    ref, ref_stats = run_decode(model, sparsify(model, spec), batch=2)
    fast, fast_stats = run_decode(model, accelerate(model, spec), batch=2)
    assert_close(fast, ref, 1e-5)
    assert fast_stats.counts() == ref_stats.counts()
    model = tiny_model("llama")
    batch = MAX_SPARSE_BATCH + 1
    ref, _ = run_decode(model, sparsify(model, spec), batch=batch)
    fast, _ = run_decode(model, accelerate(model, spec), batch=batch)
    assert_close(fast, ref, 1e-5)


def test_greedy_generation_is_unchanged():
    model = tiny_model("qwen3")
    spec = spec_for("threshold")
    prompt = torch.randint(1, 97, (1, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(
        attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
    )
    with torch.no_grad(), sparsify(model, spec):
        ref = model.generate(prompt, **kwargs)
    with torch.no_grad(), accelerate(model, spec) as stats:
        fast = model.generate(prompt, **kwargs)
    assert torch.equal(fast, ref)
    assert stats.tokens_seen("decode") > 0


def test_model_is_restored_and_copies_dropped():
    model = tiny_model("phi3")
    ids = torch.randint(1, 97, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids).logits
        with pytest.raises(RuntimeError, match="boom"), accelerate(model, spec_for("top_k")):
            raise RuntimeError("boom")
        after = model(ids).logits
    assert torch.equal(before, after)
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("family", ["llama", "phi3"])  # separate gate/up, and one fused gate_up weight
@pytest.mark.parametrize("rule", ["threshold", "max_p"])  # the fused C kernel, and the PyTorch kernels
def test_weights_are_re_laid_out_in_place_not_copied(family, rule):
    """No second copy of the weights: the kernels read the parameters' own storage, restored bit for bit."""
    model = tiny_model(family)
    params = dict(model.named_parameters())
    before = {name: (p.data_ptr(), p.stride(), p.detach().clone()) for name, p in params.items()}
    storage = sum(p.untyped_storage().nbytes() for p in params.values())
    ids = torch.randint(1, 97, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = model(ids).logits
        with sparsify(model, spec_for(rule)):
            simulated = model(ids).logits
        with accelerate(model, spec_for(rule)):
            relaid = [name for name, p in params.items() if p.stride() != before[name][1]]
            assert relaid and all("mlp" in name for name in relaid)
            assert all(p.data_ptr() == before[name][0] for name, p in params.items())
            steps = [m.forward.args[1] for m in model.modules() if "forward" in vars(m)]
            for step in steps:  # every matrix a kernel reads lies in a parameter's storage
                read = [*step.weights.__dict__.values(), *(step.fused.weights if step.fused else ())]
                for t in (t for t in read if isinstance(t, torch.Tensor)):
                    assert any(
                        t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for p in params.values()
                    )
            assert sum(p.untyped_storage().nbytes() for p in params.values()) == storage
            torch.testing.assert_close(model(ids).logits, simulated)  # the prefill's dense products run on them
        after = model(ids).logits
    assert torch.equal(after, dense)
    for name, p in params.items():
        ptr, stride, value = before[name]
        assert p.data_ptr() == ptr and p.stride() == stride and torch.equal(p, value)


def test_errors_before_and_during_work():
    model = tiny_model("llama")
    with pytest.raises(TypeError), accelerate(model, "top_p"):
        pass
    with pytest.raises(ValueError, match="layers"), accelerate(model, SparsitySpec("input", "threshold", {0: 0.1})):
        pass
    ids = torch.randint(1, 97, (1, 4))
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[0] = float("nan")  # before entry: weights are re-laid out there
        out = model(ids, use_cache=True)  # dense prefill: NaN flows silently
        with accelerate(model, spec_for("threshold")), pytest.raises(NonFiniteActivationError, match="layer 1"):
            model(ids[:, :1], attention_mask=torch.ones(1, 5, dtype=torch.long), past_key_values=out.past_key_values)


def test_scorers_see_accelerate_like_sparsify():
    from actsparse.sparsity.instrument import active_stats

    model = tiny_model("llama")
    with accelerate(model, spec_for("top_k")) as stats:
        assert active_stats(model) == [stats]
    assert active_stats(model) == []


def count_fused_calls(monkeypatch) -> list[int]:
    calls = [0]
    call = FusedFFN.__call__

    def counted(self, x, out=None, accumulate=False):
        calls[0] += 1
        return call(self, x, out, accumulate)

    monkeypatch.setattr(FusedFFN, "__call__", counted)
    return calls


@pytest.mark.skipif(not sparse_ffn_cpu.available(), reason="no C compiler for the fused kernel")
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])  # SiLU, tanh-GELU, fused gate/up
@pytest.mark.parametrize("target", ["input", "intermediate", "all_inputs"])
def test_fused_kernel_runs_batch_one_threshold_decode(family, target, monkeypatch):
    model = tiny_model(family)
    spec = spec_for("threshold", target)
    ref, ref_stats = run_decode(model, sparsify(model, spec), batch=1, seed=7)
    calls = count_fused_calls(monkeypatch)
    fast, fast_stats = run_decode(model, accelerate(model, spec), batch=1, seed=7)
    assert calls[0] == 3 * 2  # every decode step of both layers
    assert_close(fast, ref, 1e-5)
    assert fast_stats.counts() == ref_stats.counts()


@pytest.mark.skipif(not sparse_ffn_cpu.available(), reason="no C compiler for the fused kernel")
@pytest.mark.parametrize("family", ["llama", "phi3"])
@pytest.mark.parametrize("rule", ["threshold", "top_k", "top_p"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_runs_every_rule_batches_and_bfloat16(family, rule, dtype, monkeypatch):
    model = tiny_model(family, dtype=dtype)
    spec = spec_for(rule)
    for batch in (1, 3, MAX_SPARSE_BATCH):
        ref, ref_stats = run_decode(model, sparsify(model, spec), batch=batch, seed=8)
        calls = count_fused_calls(monkeypatch)
        fast, fast_stats = run_decode(model, accelerate(model, spec), batch=batch, seed=8)
        assert calls[0] == 3 * 2  # one call per decode step and layer, for the whole batch
        assert_close(fast, ref, TOL[dtype])
        if dtype == torch.float32:  # bf16 sums round differently: a tie may move across the rule
            assert fast_stats.counts() == ref_stats.counts()
        monkeypatch.undo()


@contextmanager
def counted_per_document(ctx, per_token: TokenCounts):
    """`ctx` with a scorer's per-document counting switched on (every count must reach `per_token`)."""
    with ctx as stats:
        stats.per_token = per_token
        yield stats


@pytest.mark.skipif(not sparse_ffn_cpu.available(), reason="no C compiler for the fused kernel")
@pytest.mark.parametrize("rule", ["threshold", "top_k"])
def test_fused_counts_are_the_same_totalled_in_the_kernel_or_read_per_call(rule):
    """Without per-document counting the kernel keeps running totals, read only with the stats; with it,
    each call's counts reach the scorer. Both give sparsify's counts."""
    model = tiny_model("llama")
    spec = spec_for(rule, "all_inputs")
    _, ref_stats = run_decode(model, sparsify(model, spec), batch=3, seed=9)
    _, totalled = run_decode(model, accelerate(model, spec), batch=3, seed=9)
    per_token = TokenCounts()
    _, per_call = run_decode(model, counted_per_document(accelerate(model, spec), per_token), batch=3, seed=9)
    assert totalled.counts() == ref_stats.counts() == per_call.counts()
    decode = [c for k, c in per_call.counts().items() if k[2] == "decode"]
    assert decode and sum(c[2] for c in decode) > 0
    everything = [sum(c[i] for c in per_call.counts().values()) for i in (0, 2)]
    assert per_token._expected is not None and per_token._expected.tolist() == everything


def test_pytorch_kernels_when_the_c_kernel_is_missing(monkeypatch):
    monkeypatch.setattr(sparse_ffn_cpu, "available", lambda: False)
    calls = count_fused_calls(monkeypatch)
    model = tiny_model("llama")
    spec = spec_for("threshold")
    ref, ref_stats = run_decode(model, sparsify(model, spec), batch=1)
    fast, fast_stats = run_decode(model, accelerate(model, spec), batch=1)
    assert calls[0] == 0
    assert_close(fast, ref, 1e-5)
    assert fast_stats.counts() == ref_stats.counts()


@pytest.mark.slow
@pytest.mark.parametrize("n_threads", [1, 2])
def test_smollm2_greedy_decode_equals_the_simulation(n_threads, threads):
    """Greedy decode under `accelerate` is the `sparsify` simulation's: same tokens, logits and counts.

    Run in float64. In float32 the sparse products and the simulation's dense ones sum in different
    orders, ~1e-6 apart, and the threshold rule is discontinuous: an entry within that distance of τ is
    kept by one path and dropped by the other, and at 50 % `all_inputs` one such entry moves the next
    logits by up to 5 (issue 15: 21 of 40 float32 prompts part within 24 tokens on this machine, at
    different steps on different machines and thread counts). In float64 that window is ~1e-15, so
    any difference here is a different computation (phase, real-token mask, layer, τ's dtype, state).
    """
    from actsparse.models.loading import load_model
    from actsparse.speed.calibrate import calibrate, calibration_batches, calibration_text

    threads(n_threads)
    model, tokenizer = load_model("smollm2-135m")
    model = model.double()
    batches = list(calibration_batches(tokenizer, calibration_text(), tokens=128, seq_len=128))
    spec = SparsitySpec("all_inputs", "threshold", calibrate(model, batches, "all_inputs", 0.5))
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    kwargs = dict(
        max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    with torch.no_grad(), sparsify(model, spec) as ref_stats:
        ref = model.generate(**prompt, **kwargs)
    with torch.no_grad(), accelerate(model, spec) as fast_stats:
        fast = model.generate(**prompt, **kwargs)
    assert torch.equal(fast.sequences, ref.sequences)
    assert_close(torch.stack(fast.logits), torch.stack(ref.logits), 1e-10)
    assert fast_stats.counts() == ref_stats.counts()
    assert abs(fast_stats.overall("decode") - 0.5) < 0.1  # the calibrated 50 %, on decode tokens
    from actsparse.speed.decoding import StaticDecoder  # the benchmarks' decode loop: the same tokens and counts

    with torch.no_grad(), accelerate(model, spec) as static_stats:
        static = StaticDecoder(model).generate(prompt["input_ids"], 12)
    assert torch.equal(static, ref.sequences[:, prompt["input_ids"].shape[1] :])
    assert static_stats.counts() == ref_stats.counts()


@needs_cuda
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_threshold_decode_step_never_waits_for_the_gpu(batch):
    """What the module docstring promises: a threshold decode step, counted over real tokens, without a sync."""
    from actsparse.models.adapters import find_ffns
    from actsparse.sparsity.instrument import TokenContext
    from actsparse.sparsity.stats import SparsityStats
    from actsparse.speed.accelerate import DecodeStep

    model = tiny_model("llama", dtype=torch.bfloat16).to("cuda")
    ffn = find_ffns(model)[0]
    gated = ffn.adapter.gated_weights(ffn.module)
    spec = spec_for("threshold")
    tokens = TokenContext()
    tokens.phase, tokens.real = "decode", torch.ones(batch, 1, dtype=torch.bool, device="cuda")
    stats = SparsityStats(spec.vectors)
    step = DecodeStep(spec, 0, gated, tokens, stats)
    x = torch.randn(batch, 1, gated.gate.shape[1], device="cuda", dtype=torch.bfloat16)
    step(x)  # first call: τ is copied to the GPU once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    step.masks.check()
    assert stats.overall("decode") == stats.overall("decode")
