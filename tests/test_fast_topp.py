"""The fast top-p and top-k paths (compiled CPU, PyTorch radix, Triton) against the slow reference.

Values lie on a dyadic grid (m·2^e, |m| < 256, e in [-14, 6]) so that every float64 sum is exact in any
order: the fast paths add in another order than the reference, and on such data they must agree bit
for bit, ties and all.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DTYPES, fractions, vector_strategy
from hypothesis import given, settings
from tiny import tiny_model

from actsparse import SparsitySpec, sparsify
from actsparse.models.loading import load_model
from actsparse.sparsity import rules
from actsparse.sparsity.rules import NonFiniteActivationError, reference_mask
from actsparse.speed.kernels import topp, topp_cpu, topp_triton

SHAPES = [(40,), (1, 96), (6, 75), (2, 3, 50), (3, 700)]


def dyadic_vector(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random, tied, zero-heavy, outlier-heavy or all-zero values on an exact-sum-safe dyadic grid."""
    rng = np.random.default_rng(seed)
    m = rng.integers(-255, 256, shape).astype(np.float64)
    if kind == "random":
        x = m * np.exp2(rng.integers(-8, 1, shape))
    elif kind == "tied":
        x = rng.integers(-3, 4, shape) * 0.5
    elif kind == "zeros":
        x = m * np.exp2(rng.integers(-8, 1, shape)) * (rng.random(shape) < 0.2)
    elif kind == "outliers":
        x = m * np.exp2(rng.integers(-14, -7, shape))
        idx = rng.integers(0, shape[-1], 3)
        x[..., idx] = rng.integers(1, 256, 3) * np.exp2(6) * rng.choice([-1, 1], 3)
    else:
        x = np.zeros(shape)
    return torch.tensor(x, dtype=torch.float32).to(dtype)


vectors = vector_strategy(dyadic_vector, SHAPES)

needs_c = pytest.mark.skipif(not topp_cpu.available(), reason="no C compiler for the compiled kernel")
needs_triton = pytest.mark.skipif(not topp_triton.available(), reason="triton, and a GPU or TRITON_INTERPRET=1, needed")


def triton_mask(v: torch.Tensor, p: float) -> torch.Tensor:
    """The Triton kernel on the GPU when there is one, else under the interpreter on the CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return topp_triton.top_p_mask_triton(v.to(device), p).cpu()


@needs_c
@settings(max_examples=200, deadline=None)
@given(v=vectors, p=fractions)
def test_compiled_top_p_equals_reference_and_sort(v: torch.Tensor, p: float) -> None:
    keep = rules.top_p_mask(v, p)
    assert keep.shape == v.shape and keep.dtype == torch.bool
    assert torch.equal(keep, reference_mask(v, "top_p", p))
    assert torch.equal(keep, rules.top_p_mask_sort(v, p))


@settings(max_examples=80, deadline=None)
@given(v=vectors, p=fractions)
def test_radix_top_p_equals_reference(v: torch.Tensor, p: float) -> None:
    assert torch.equal(topp.top_p_mask_radix(v, p), reference_mask(v, "top_p", p))


@needs_c
@settings(max_examples=120, deadline=None)
@given(v=vectors, f=fractions)
def test_compiled_top_k_equals_reference(v: torch.Tensor, f: float) -> None:
    keep = rules.top_k_mask(v, f)
    assert keep.dtype == torch.bool
    assert torch.equal(keep, reference_mask(v, "top_k", f))


@pytest.mark.triton
@needs_triton
@settings(max_examples=30, deadline=None)
@given(v=vectors, p=fractions)
def test_triton_top_p_equals_reference(v: torch.Tensor, p: float) -> None:
    assert torch.equal(triton_mask(v, p), reference_mask(v, "top_p", p))


LONG_KINDS = ["wide", "close", "same", "ulps", "tail"]


def long_rows(kind: str) -> torch.Tensor:
    """Rows long enough to fill the radix levels: wide-range values, near-equal values, one repeated value,
    four neighbouring values, a few large values over zeros and a tail too small to move a float32 sum."""
    rng = np.random.default_rng(7)
    if kind == "wide":
        x = rng.integers(-255, 256, (4, 4096)) * np.exp2(rng.integers(-10, 1, (4, 4096)))
    elif kind == "close":  # share their top 12 bits, differ in the low ones
        x = 1.0 + rng.integers(0, 2**20, (4, 1536)) * 2.0**-23
    elif kind == "same":
        x = np.full((4, 1536), 0.375)
    elif kind == "ulps":  # four values a float32 ulp apart, in every order
        x = 1.0 + rng.integers(0, 4, (4, 1536)) * 2.0**-23
    else:
        x = np.full((4, 1536), 2.0**-30)
        x[:, 1::50] = 0.0
        x[:, ::97] = rng.integers(1, 9, (4, 16))
    return torch.tensor(x, dtype=torch.float32)


@needs_c
@pytest.mark.parametrize("kind", LONG_KINDS)
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 0.999, 1.0])
def test_long_rows_equal_reference(kind: str, p: float) -> None:
    v = long_rows(kind)
    expected = reference_mask(v, "top_p", p)
    assert torch.equal(topp.top_p_mask_fast(v, p), expected)
    assert torch.equal(topp.top_p_mask_radix(v, p), expected)
    assert torch.equal(rules.top_k_mask(v, p), reference_mask(v, "top_k", p))


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("kind", LONG_KINDS)
def test_triton_long_rows_equal_reference(kind: str) -> None:
    v = long_rows(kind)[:2]
    for p in (0.9, 1.0):
        assert torch.equal(triton_mask(v, p), reference_mask(v, "top_p", p)), p


def heavy_tailed_rows() -> torch.Tensor:
    """Continuous values over ~20 orders of magnitude: float64 sums round, in every order."""
    gen = torch.Generator().manual_seed(3)
    return torch.randn(8, 1536, generator=gen) * torch.exp(torch.randn(8, 1536, generator=gen) * 4)


@pytest.mark.parametrize("p", [0.3, 0.9, 1.0])
def test_heavy_tailed_rows_equal_reference(p: float) -> None:
    v = heavy_tailed_rows()
    expected = reference_mask(v, "top_p", p)
    assert torch.equal(rules.top_p_mask(v, p), expected)
    assert torch.equal(topp.top_p_mask_radix(v, p), expected)
    if topp_triton.available():
        assert torch.equal(triton_mask(v[:3], p), expected[:3])


PATHS = {
    "dispatch": rules.top_p_mask,
    "radix": topp.top_p_mask_radix,
    "op": lambda v, p: torch.ops.actsparse.top_p_mask(v, p),
    "triton": triton_mask,
}


def path(name: str):
    if name == "triton" and not topp_triton.available():
        pytest.skip("triton not available")
    return PATHS[name]


@pytest.mark.parametrize("name", PATHS)
def test_edge_cases(name: str) -> None:
    mask = path(name)
    v = torch.tensor([[0.5, -2.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, -0.0, 0.25]])
    assert mask(v, 0.0).tolist() == [[False, True, True, False, False], [True] * 5, [True, False, False, False, False]]
    assert mask(v, 1.0).tolist() == [[True, True, True, False, True], [True] * 5, [True, False, False, False, True]]
    assert mask(v[0], 0.5).tolist() == [False, True, True, False, False]
    assert mask(v[:, :0], 0.5).shape == (3, 0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter computes Inf - Inf on the way
@pytest.mark.parametrize("name", PATHS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_raises(name: str, bad: float, dtype: torch.dtype) -> None:
    mask = path(name)
    v = torch.ones(3, 8, dtype=dtype)
    v[1, 5] = bad
    with pytest.raises(NonFiniteActivationError):
        mask(v, 0.9)
    if name == "dispatch":
        with pytest.raises(NonFiniteActivationError):
            rules.top_k_mask(v, 0.5)


def test_fused_top_p_matches_mask_then_zeroing_and_keeps_autograd() -> None:
    v = dyadic_vector("outliers", (5, 64), torch.bfloat16, 11)
    sparse, keep = topp.top_p_fast(v, 0.8)
    assert torch.equal(keep, reference_mask(v, "top_p", 0.8))
    assert torch.equal(sparse, rules.apply_mask(v, keep))
    assert not torch.signbit(sparse[~keep]).any()  # dropped entries are +0, as torch.where gives
    w = v.float().requires_grad_()
    rules.top_p(w, 0.8).sum().backward()
    assert w.grad is not None and torch.equal(w.grad, keep.float())


def test_other_layouts_and_dtypes() -> None:
    v = dyadic_vector("random", (64, 48), torch.float32, 3)
    assert torch.equal(rules.top_p_mask(v.t(), 0.8), reference_mask(v.t(), "top_p", 0.8))
    assert torch.equal(rules.top_p_mask(v[:, ::2], 0.8), reference_mask(v[:, ::2], "top_p", 0.8))
    assert torch.equal(rules.top_p_mask(v.double(), 0.8), reference_mask(v, "top_p", 0.8))
    assert torch.equal(rules.top_k_mask(v.t(), 0.3), reference_mask(v.t(), "top_k", 0.3))


def test_custom_op_registration() -> None:
    v = dyadic_vector("random", (4, 32), torch.float32, 5)
    torch.library.opcheck(topp.top_p_mask_op, (v, 0.7))


def sparsified_run(model, ids: torch.Tensor, target: str, p: float) -> tuple[torch.Tensor, dict]:
    with torch.no_grad(), sparsify(model, SparsitySpec(target, "top_p", p)) as stats:
        logits = model(ids, attention_mask=torch.ones_like(ids)).logits
    return logits, stats.to_dict()


def sort_path(patch: pytest.MonkeyPatch) -> list[int]:
    """Route every top-p of `rules.masked` / `rules.top_p_mask` to the sort path (the C kernel off); the
    list counts its calls, so that a test can see the sort path really ran."""
    calls: list[int] = []

    def sort(v: torch.Tensor, p: float) -> torch.Tensor:
        calls.append(1)
        return rules.top_p_mask_sort(v, p)

    patch.setattr(topp_cpu, "available", lambda: False)
    patch.setattr(topp, "top_p_mask_fast", sort)
    return calls


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen3_moe"])
def test_sparsify_gives_the_same_results_as_the_sort_path(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(family)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    fast = sparsified_run(model, ids, "all_inputs", 0.7)
    calls = sort_path(monkeypatch)
    sort = sparsified_run(model, ids, "all_inputs", 0.7)
    assert calls  # the comparison is with the sort path, not the fast path again
    assert torch.equal(fast[0], sort[0])
    assert fast[1] == sort[1]


@pytest.mark.slow
def test_smollm2_sparsified_logits_unchanged_by_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = load_model("smollm2-135m")
    ids = tokenizer(["The fast top-p rule must give the paper's masks, bit for bit, on a real model."] * 2)
    ids = torch.tensor(ids["input_ids"])
    for target in ("input", "intermediate"):
        fast = sparsified_run(model, ids, target, 0.9)
        with monkeypatch.context() as patch:
            calls = sort_path(patch)
            sort = sparsified_run(model, ids, target, 0.9)
        assert calls, target
        assert torch.equal(fast[0], sort[0]), target
        assert fast[1] == sort[1], target


def absorbed_rows(dtype: torch.dtype) -> torch.Tensor:
    """Rows where float64 sums absorb a tiny entry beside a huge one: p = 1 must still keep it."""
    v = torch.zeros(3, 70)
    v[0, :3] = torch.tensor([2.0**30, -(2.0**-30), 1.0])
    v[1, ::7] = 2.0**-30
    v[1, 5] = -(2.0**30)
    return v.to(dtype)  # row 2 stays all zero: left as it is


P_ONE_PATHS = {
    "reference": lambda v: reference_mask(v, "top_p", 1.0),
    "sort": lambda v: rules.top_p_mask_sort(v, 1.0),
    "dispatch": lambda v: rules.top_p_mask(v, 1.0),
    "fused": lambda v: rules.masked(v, "top_p", 1.0)[1],
    "radix": lambda v: topp.top_p_mask_radix(v, 1.0),
    "compiled": lambda v: topp_cpu.select_mask(v, topk=False, value=1.0)[0],
    "op": lambda v: torch.ops.actsparse.top_p_mask(v, 1.0),
    "triton": lambda v: triton_mask(v, 1.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", P_ONE_PATHS)
def test_p_one_keeps_every_nonzero_entry(name: str, dtype: torch.dtype) -> None:
    if name == "compiled" and not topp_cpu.available():
        pytest.skip("no C compiler for the compiled kernel")
    if name in ("compiled", "radix", "triton") and dtype == torch.float64:
        pytest.skip("float32-key paths: float64 takes the sort path")
    if name == "triton" and not topp_triton.available():
        pytest.skip("triton not available")
    v = absorbed_rows(dtype)
    keep = P_ONE_PATHS[name](v)
    expected = (v != 0) | torch.tensor([[False], [False], [True]])
    assert torch.equal(keep, expected)
    assert torch.equal(rules.top_p(v, 1.0), v)  # p = 1 zeroes only exact zeros
