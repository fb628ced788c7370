"""The field's methods: WINA and outlier-aware top-p held to their slow references on adversarial rows,
the greedy allocation, and the methods' options refused before any model work."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rules import DTYPES, SHAPES, make_vector
from tiny import tiny_model

from actsparse.methods import method_mask, point_spec, reference_method_mask, sparsify
from actsparse.methods.allocation import ErrorCurves, allocate
from actsparse.methods.outlier_topp import top_p_outlier_mask
from actsparse.methods.wina import column_norms, wina_top_k_mask, wina_top_p_mask
from actsparse.sparsity.spec import SparsitySpec

KINDS = ["random", "tied", "zeros", "outliers", "all_zero", "one_huge"]


def adversarial(kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """The rules' test vectors, plus rows with a single entry many orders above the rest."""
    if kind != "one_huge":
        return make_vector(kind, shape, dtype, seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 0.01
    x[..., rng.integers(0, shape[-1])] = 1e4
    return torch.tensor(x, dtype=torch.float32).to(dtype)


vectors = st.builds(
    adversarial,
    kind=st.sampled_from(KINDS),
    shape=st.sampled_from(SHAPES),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31),
)
fractions = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 0.9, 0.99]), st.floats(0, 1))


def norms_for(n: int, kind: str, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if kind == "tied":
        return torch.ones(n)
    if kind == "zero":  # a column of zeros: its entries score 0 whatever their value
        w = rng.uniform(0.5, 2.0, n)
        w[0] = 0.0
        return torch.tensor(w, dtype=torch.float32)
    return torch.tensor(rng.uniform(0.1, 3.0, n), dtype=torch.float32)


@settings(max_examples=150, deadline=None)
@given(
    v=vectors,
    p=fractions,
    rule=st.sampled_from(["wina_top_p", "wina_top_k"]),
    nk=st.sampled_from(["random", "tied", "zero"]),
)
def test_wina_masks_equal_reference(v: torch.Tensor, p: float, rule: str, nk: str) -> None:
    norms = norms_for(v.shape[-1], nk, seed=int(v.numel()))
    fn = wina_top_p_mask if rule == "wina_top_p" else wina_top_k_mask
    keep = fn(v, p, norms)
    assert keep.shape == v.shape and keep.dtype == torch.bool
    assert torch.equal(keep, reference_method_mask(v, rule, p, norms))


@settings(max_examples=150, deadline=None)
@given(v=vectors, p=fractions, m=st.sampled_from([1.0, 3.0, 100.0, 1e4]))
def test_top_p_outlier_equals_reference(v: torch.Tensor, p: float, m: float) -> None:
    keep = top_p_outlier_mask(v, p, m)
    assert torch.equal(keep, reference_method_mask(v, "top_p_outlier", p, m))


def test_wina_by_hand() -> None:
    v = torch.tensor([4.0, -3.0, 2.0, 1.0])
    norms = torch.tensor([0.1, 1.0, 1.0, 10.0])  # scores 0.4, 3, 2, 10: the small |v| with a big column wins
    assert wina_top_k_mask(v, 0.25, norms).tolist() == [False, False, False, True]
    assert wina_top_p_mask(v, 0.8, norms).tolist() == [False, True, False, True]  # 10 < 0.8·15.4 ≤ 13
    assert wina_top_p_mask(v, 0.0, torch.ones(4)).tolist() == [True, False, False, False]  # plain top-p


def test_top_p_outlier_by_hand() -> None:
    v = torch.tensor([1000.0, 4.0, -3.0, 2.0, 1.0])  # median |v| = 3; 1000 > 100·3 is an outlier
    keep = top_p_outlier_mask(v, 0.5, 100.0)
    assert keep.tolist() == [True, True, True, False, False]  # top-p 0.5 of [4, 3, 2, 1]: 4 < 5 ≤ 7
    # plain top-p at 0.5 would keep only the outlier
    from actsparse.sparsity.rules import top_p_mask

    assert top_p_mask(v, 0.5).tolist() == [True, False, False, False, False]
    ties = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert top_p_outlier_mask(ties, 0.1).tolist() == [True] * 4


def test_column_norms_are_those_of_the_consuming_matrix() -> None:
    model = tiny_model("llama")
    norms = column_norms(model)
    mlp = model.model.layers[1].mlp
    stacked = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    assert torch.allclose(norms[1]["input"], stacked.norm(dim=0))
    assert torch.allclose(norms[1]["intermediate"], mlp.down_proj.weight.norm(dim=0))
    assert column_norms(model) is norms  # computed once per model


@pytest.mark.parametrize("rule", ["wina_top_p", "top_p_outlier"])
@pytest.mark.parametrize("target", ["input", "intermediate"])
def test_method_rules_run_on_a_model_and_count(rule: str, target: str) -> None:
    model = tiny_model("llama")
    spec = point_spec(model, None, target, rule, 0.7, None)
    ids = torch.randint(1, 97, (2, 12))
    mlp = model.model.layers[0].mlp
    consumer = mlp.gate_proj if target == "input" else mlp.down_proj  # layer 0 sees the same x either way
    seen: list[torch.Tensor] = []
    handle = consumer.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    mask = torch.ones_like(ids)  # every token real: a batch under sparsify says so
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        with sparsify(model, spec) as stats:
            model(input_ids=ids, attention_mask=mask)
    handle.remove()
    dense, sparse = seen
    assert 0 < stats.overall() < 1
    keep = method_mask(spec, 0, target, dense)
    assert torch.equal(sparse, torch.where(keep, dense, 0.0))


def test_greedy_allocation_meets_the_target_and_prefers_cheap_layers() -> None:
    levels = np.round(np.arange(0, 1.0 - 1e-9, 0.05), 6)
    cheap, costly = levels**2 * 0.01, levels**2
    curves = ErrorCurves(
        [(0, "input"), (1, "input")], np.array([10.0, 10.0]), np.stack([cheap, costly]), np.zeros((2, 201))
    )
    alloc = allocate(curves, 0.4)
    assert alloc.mean() == pytest.approx(0.4)
    assert alloc[0] > alloc[1]
    weighted = ErrorCurves(
        [(0, "input"), (1, "intermediate")], np.array([10.0, 30.0]), np.stack([costly, costly]), np.zeros((2, 201))
    )
    alloc = allocate(weighted, 0.5)
    assert (alloc * np.array([10, 30])).sum() / 40 == pytest.approx(0.5)
    assert allocate(curves, 0.0).tolist() == [0.0, 0.0]


def test_spec_knows_the_method_rules() -> None:
    assert SparsitySpec("input", "wina_top_p", 0.5).value == 0.5
    with pytest.raises(ValueError, match="must lie in"):
        SparsitySpec("input", "top_p_outlier", 1.5)
