"""Critical sparsity, normalised performance and the paired bootstrap on hand-made curves."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actsparse.analysis import (
    Curve,
    agreement,
    analyse_curve,
    critical_sparsity,
    critical_sparsity_batch,
    mean_kl,
    normalized_performance,
    ratio,
    resample_weights,
)
from actsparse.evaluate.results import DocResult


def test_interpolates_between_the_bracketing_points() -> None:
    c = critical_sparsity([0.1, 0.3, 0.5], [1.0, 0.995, 0.97])
    # 0.995 → 0.97 crosses 0.99 a fifth of the way from 0.3 to 0.5
    assert c.value == pytest.approx(0.34)
    assert c.grid_value == pytest.approx(0.3)
    assert c.grid_index == 1
    assert not c.lower_bound


def test_points_are_sorted_by_achieved_sparsity_not_by_order_given() -> None:
    c = critical_sparsity([0.5, 0.1, 0.3], [0.97, 1.0, 0.995])
    assert c.value == pytest.approx(0.34)
    assert c.grid_index == 2  # index into the caller's order


def test_first_crossing_wins_even_if_the_curve_recovers() -> None:
    c = critical_sparsity([0.1, 0.2, 0.3, 0.4], [0.999, 0.98, 0.995, 0.90])
    assert c.grid_value == pytest.approx(0.1)
    assert c.value == pytest.approx(0.1 + 0.1 * (0.999 - 0.99) / (0.999 - 0.98))


def test_crossing_right_after_dense_interpolates_from_dense_at_one() -> None:
    c = critical_sparsity([0.4], [0.89])
    assert c.grid_value == 0.0 and c.grid_index == -1
    assert c.value == pytest.approx(0.4 * 0.01 / 0.11)


def test_never_crossing_is_a_lower_bound_at_the_highest_sparsity() -> None:
    c = critical_sparsity([0.2, 0.6, 0.4], [1.0, 0.991, 1.01])
    assert c.lower_bound
    assert c.value == c.grid_value == pytest.approx(0.6)
    assert c.grid_index == 1


def test_exactly_at_threshold_is_not_a_crossing() -> None:
    c = critical_sparsity([0.1, 0.2], [0.99, 0.98])
    assert c.grid_value == pytest.approx(0.1)
    assert c.value == pytest.approx(0.1)


def test_nan_performance_never_counts_as_a_crossing() -> None:
    c = critical_sparsity([0.1, 0.2, 0.3], [float("nan"), 1.0, 0.5])
    assert not c.lower_bound and 0.2 < c.value < 0.3


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="3 sparsities"):
        critical_sparsity_batch(np.array([0.1, 0.2, 0.3]), np.ones((4, 2)))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.01, 0.99), st.floats(0.5, 1.1)),
        min_size=1,
        max_size=8,
        unique_by=lambda p: p[0],
    )
)
def test_batch_agrees_with_a_plain_loop(points: list[tuple[float, float]]) -> None:
    xs, ps = [p[0] for p in points], [p[1] for p in points]
    c = critical_sparsity(xs, ps)
    curve = [(0.0, 1.0), *sorted(points)]
    expected, grid, lower = curve[-1][0], curve[-1][0], True
    for (x0, p0), (x1, p1) in itertools.pairwise(curve):
        if p1 < 0.99:
            expected, grid, lower = x0 + (p0 - 0.99) / (p0 - p1) * (x1 - x0), x0, False
            break
    assert c.value == pytest.approx(expected)
    assert c.grid_value == pytest.approx(grid)
    assert c.lower_bound == lower
    assert c.grid_value <= c.value


def test_normalized_performance_is_the_mean_of_ratios() -> None:
    assert normalized_performance({"a": 0.5, "b": 0.9}, {"a": 0.5, "b": 1.0}) == pytest.approx(0.95)
    # a task whose dense score is 0 has no ratio: left out
    assert normalized_performance({"a": 0.4, "b": 0.1}, {"a": 0.5, "b": 0.0}) == pytest.approx(0.8)
    assert math.isnan(normalized_performance({"b": 0.1}, {"b": 0.0}))
    assert np.isnan(ratio(1.0, 0.0))


def test_resample_weights_count_each_draw() -> None:
    w = resample_weights(7, 50, np.random.default_rng(0))
    assert w.shape == (50, 7)
    assert (w.sum(axis=1) == 7).all()
    assert (w >= 0).all()


def _curve(n_docs: int, seed: int = 0) -> Curve:
    """Two tasks; accuracy drops with sparsity: per-document scores drawn around a known curve."""
    rng = np.random.default_rng(seed)
    sparsity = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    keep = np.array([1.0, 0.995, 0.98, 0.9, 0.8])  # chance that a correct dense answer stays correct
    dense, scores = {}, {}
    for task, acc in (("a", 0.7), ("b", 0.6)):
        d = (rng.random(n_docs) < acc).astype(float)
        u = rng.random(n_docs)
        dense[task] = d
        scores[task] = np.stack([d * (u < k) for k in keep])  # nested: paired, monotone damage
    return Curve("input", "top_p", [0.9, 0.8, 0.7, 0.6, 0.5], sparsity, {t: sparsity for t in dense}, dense, scores)


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_documents() -> None:
    small = analyse_curve(_curve(100), resamples=400, seed=1)
    large = analyse_curve(_curve(3000), resamples=400, seed=1)
    for result in (small, large):
        low, high = result.ci
        assert low <= result.critical.value <= high
        for task, (c, (lo, hi)) in result.per_task.items():
            assert lo <= c.value <= hi, task
    assert large.ci[1] - large.ci[0] < small.ci[1] - small.ci[0]
    assert 0.2 <= large.critical.value <= 0.35  # the true curve crosses 0.99 between 0.2 and 0.3


def test_bootstrap_is_seeded() -> None:
    a = analyse_curve(_curve(200), resamples=200, seed=3)
    b = analyse_curve(_curve(200), resamples=200, seed=3)
    c = analyse_curve(_curve(200), resamples=200, seed=4)
    assert a.ci == b.ci
    assert a.ci != c.ci or a.per_task != c.per_task


def test_bootstrap_is_paired() -> None:
    """Identical dense and sparse scores: every resample sees ratio 1 (an unpaired one would not)."""
    curve = _curve(50)
    curve.scores = {t: np.stack([d] * 5) for t, d in curve.dense.items()}
    result = analyse_curve(curve, resamples=200)
    assert result.critical.lower_bound
    assert result.ci == (pytest.approx(0.5), pytest.approx(0.5))


def _doc(i: int, answer: str, kl: float | None = None, tokens: int = 1) -> DocResult:
    return DocResult(i, 1.0, answer=answer, kl=kl, tokens=tokens)


def test_mean_kl_is_token_weighted_and_agreement_is_paired() -> None:
    assert mean_kl([_doc(0, "a", 1.0, 1), _doc(1, "a", 4.0, 3)]) == pytest.approx(13 / 4)
    assert mean_kl([_doc(0, "a")]) is None
    dense = [_doc(0, "1"), _doc(1, "2"), _doc(2, "0")]
    sparse = [_doc(0, "1"), _doc(1, "0"), _doc(3, "0")]  # doc 3 is not in the dense run
    assert agreement(dense, sparse) == pytest.approx(0.5)
    assert agreement(dense, []) is None
