"""The rules against their slow references, on the kinds of vectors real FFNs produce."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DTYPES, fractions, vector_strategy
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.sparsity import rules
from actsparse.sparsity.rules import NonFiniteActivationError, reference_mask

SHAPES = [(33,), (5, 40), (2, 3, 24)]


def make_vector(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random, tied, zero-filled, outlier-heavy ('massive activation') or all-zero vectors."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        x = rng.standard_normal(shape)
    elif kind == "tied":
        x = rng.integers(-3, 4, shape) * 0.5
    elif kind == "zeros":
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.3)
    elif kind == "outliers":
        x = rng.standard_normal(shape) * 0.05
        x[..., rng.integers(0, shape[-1], 2)] = rng.choice([-1, 1], 2) * rng.uniform(50, 500, 2)
    else:
        x = np.zeros(shape)
    return torch.tensor(x, dtype=torch.float32).to(dtype)


vectors = vector_strategy(make_vector, SHAPES)


@settings(max_examples=150, deadline=None)
@given(v=vectors, p=fractions, rule=st.sampled_from(["top_p", "top_k", "max_p"]))
def test_rule_masks_equal_reference(v: torch.Tensor, p: float, rule: str) -> None:
    keep = rules.RULES[rule](v, p)
    assert keep.shape == v.shape and keep.dtype == torch.bool
    assert torch.equal(keep, reference_mask(v, rule, p))


@settings(max_examples=60, deadline=None)
@given(v=vectors, p=fractions)
def test_sort_based_top_p_equals_reference(v: torch.Tensor, p: float) -> None:
    assert torch.equal(rules.top_p_mask_sort(v, p), reference_mask(v, "top_p", p))


@settings(max_examples=60, deadline=None)
@given(v=vectors, tau=st.sampled_from([0.0, 0.1, 0.5, 1.0, 3.0]))
def test_threshold_equals_reference(v: torch.Tensor, tau: float) -> None:
    assert torch.equal(rules.threshold_mask(v, tau), reference_mask(v, "threshold", tau))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["top_p", "top_k", "max_p", "threshold"])
def test_rules_keep_dtype_device_and_zero_the_rest(name: str, dtype: torch.dtype) -> None:
    v = make_vector("random", (4, 64), dtype, seed=1)
    out = getattr(rules, name)(v, 0.5)
    keep = rules.RULES[name](v, 0.5)
    assert out.dtype == dtype and out.device == v.device and out.shape == v.shape
    assert torch.equal(out[keep], v[keep])
    assert bool((out[~keep] == 0).all())


def test_top_p_semantics_by_hand() -> None:
    v = torch.tensor([4.0, -3.0, 2.0, 1.0, 0.0])  # |v| sums to 10
    assert rules.top_p(v, 0.5).tolist() == [4.0, -3.0, 0.0, 0.0, 0.0]  # 4 < 5 ≤ 7: the crossing entry is kept
    assert rules.top_p(v, 0.7).tolist() == [4.0, -3.0, 0.0, 0.0, 0.0]  # exactly 7 reaches 0.7·10
    assert rules.top_p(v, 0.0).tolist() == [4.0, 0.0, 0.0, 0.0, 0.0]  # the maximum only
    assert rules.top_p(v, 1.0).tolist() == [4.0, -3.0, 2.0, 1.0, 0.0]  # only exact zeros go
    ties = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert rules.top_p(ties, 0.1).tolist() == [1.0, 1.0, 1.0, 1.0]  # ties with τ are kept
    zero = torch.zeros(6)
    assert torch.equal(rules.top_p(zero, 0.5), zero)


def test_top_k_and_max_p_by_hand() -> None:
    v = torch.tensor([4.0, -3.0, 2.0, 1.0])
    assert rules.top_k(v, 0.5).tolist() == [4.0, -3.0, 0.0, 0.0]
    assert rules.top_k(v, 0.0).tolist() == [4.0, 0.0, 0.0, 0.0]  # at least one entry
    assert rules.top_k(torch.tensor([2.0, 2.0, 1.0]), 0.34).tolist() == [2.0, 2.0, 0.0]  # ties with the k-th
    assert rules.max_p(v, 0.5).tolist() == [4.0, -3.0, 2.0, 0.0]
    assert rules.threshold(v, 2.0).tolist() == [4.0, -3.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["top_p", "top_k", "max_p", "threshold"])
def test_non_finite_activations_raise(name: str, bad: float) -> None:
    v = torch.randn(3, 16)
    v[1, 5] = bad
    with pytest.raises(NonFiniteActivationError):
        getattr(rules, name)(v, 0.5)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
@pytest.mark.parametrize("name", ["top_p", "top_k", "max_p"])
def test_out_of_range_values_raise(name: str, value: float) -> None:
    with pytest.raises(ValueError, match="must lie in"):
        getattr(rules, name)(torch.randn(8), value)
