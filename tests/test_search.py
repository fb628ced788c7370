"""Bisection on a rule's value finds the critical sparsity within the precision, with few evaluations."""

from __future__ import annotations

import contextlib
import math
import sqlite3

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tiny import tiny_lm, tiny_task

from actsparse.analysis import critical_sparsity
from actsparse.report import write_report
from actsparse.study.search import Bisection, bisect_curves
from actsparse.study.store import RunStore
from actsparse.study.sweep import SweepConfig, run_sweep

PAPER = [1.0, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91]
PAPER += [0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10, 0.0]


def top_p_curve(shape: float, crossing: float, power: float):
    """A top-p-like curve: sparsity (1 - p)^shape, performance 1 - 0.01·(s / crossing)^power."""

    def measure(p: float) -> tuple[float, float]:
        s = (1 - p) ** shape
        return s, 1 - 0.01 * (s / crossing) ** power

    return measure


def run(bisection: Bisection, measure) -> Bisection:
    while (value := bisection.next_value()) is not None:
        bisection.record(value, *measure(value))
    return bisection


@settings(max_examples=60, deadline=None)
@given(
    shape=st.floats(0.15, 1.0),
    crossing=st.floats(0.05, 0.9),
    power=st.floats(0.5, 4.0),
    precision=st.sampled_from([0.005, 0.01, 0.02, 0.05]),
)
def test_refined_bisection_lands_within_precision_of_the_true_crossing(shape, crossing, power, precision) -> None:
    assume(crossing ** (1 / shape) > 1e-3)  # the crossing is at p < 0.999 (values have 6 decimals)
    measure = top_p_curve(shape, crossing, power)
    bisection = run(Bisection("top_p", precision, refine=True), measure)
    found = bisection.critical()
    assert not found.lower_bound
    assert abs(found.value - crossing) <= precision + 1e-9
    (_, ok), (_, bad) = bisection.bracket()
    assert ok - 1e-9 <= crossing <= bad + 1e-9 and bad - ok <= precision
    assert len(bisection.points) <= len(bisection.scan) + 16


@settings(max_examples=80, deadline=None)
@given(
    shape=st.floats(0.15, 1.0),
    crossing=st.floats(0.02, 0.95),
    power=st.floats(0.5, 4.0),
    precision=st.sampled_from([0.005, 0.01, 0.02, 0.05, 0.2]),
)
def test_bisection_gives_the_full_grid_value_with_at_most_half_its_points(shape, crossing, power, precision) -> None:
    measure = top_p_curve(shape, crossing, power)
    grid = critical_sparsity(*zip(*(measure(p) for p in PAPER), strict=True))
    bisection = run(Bisection("top_p", precision, grid=PAPER), measure)
    assert len(bisection.points) + 1 <= len(PAPER) // 2  # the dense point counted too
    assert all(v in PAPER for v in bisection.points)
    found = bisection.critical()
    assert found.lower_bound == grid.lower_bound
    assert abs(found.value - grid.value) <= precision + 1e-12
    (ok_value, _), bad = bisection.bracket()
    if bad is not None and abs(PAPER.index(ok_value) - PAPER.index(bad[0])) == 1:
        assert found.value == pytest.approx(grid.value, abs=1e-12)  # closed on grid neighbours: the grid's reading
        assert found.grid_value == pytest.approx(grid.grid_value, abs=1e-12)


def test_half_the_paper_grid_and_the_grid_value_on_a_realistic_curve() -> None:
    measure = top_p_curve(0.3, 0.35, 2.0)  # p = 0.9 → 50 % sparsity; crossing near p = 0.97
    grid = critical_sparsity(*zip(*(measure(p) for p in PAPER), strict=True))
    bisection = run(Bisection("top_p", 0.01), measure)
    assert len(bisection.points) <= len(PAPER) // 2
    assert abs(bisection.critical().value - grid.value) <= 0.01
    assert abs(bisection.critical().value - 0.35) <= 0.01


def test_the_first_crossing_is_found_when_the_curve_climbs_back() -> None:
    def measure(p: float) -> tuple[float, float]:  # below 99 % for sparsity in [0.3, 0.45], then again past 0.7
        s = (1 - p) ** 0.3
        return s, 0.95 if 0.3 <= s <= 0.45 else 1 - 0.01 * (s / 0.7) ** 2

    grid = critical_sparsity(*zip(*(measure(p) for p in PAPER), strict=True))
    bisection = run(Bisection("top_p", 0.01), measure)
    assert bisection.critical().value == pytest.approx(grid.value) and abs(grid.value - 0.3) <= 0.02
    assert len(bisection.points) <= len(PAPER) // 2
    refined = run(Bisection("top_p", 0.01, refine=True), measure)
    assert abs(refined.critical().value - 0.3) <= 0.01


def test_max_p_bisects_the_other_way() -> None:
    def measure(p: float) -> tuple[float, float]:  # max_p: a larger p zeroes more
        return p**0.5, 1 - 0.01 * (p**0.5 / 0.6) ** 3

    bisection = run(Bisection("max_p", 0.01, grid=PAPER), measure)
    assert bisection.scan == [0.4, 0.7, 0.9, 0.94, 0.975, 0.995, 1.0]  # from the densest to the sparsest
    assert abs(bisection.critical().value - 0.6) <= 0.01


def test_each_rule_bisects_its_own_grid_from_its_dense_end() -> None:
    from actsparse.sparsity.registry import RULES

    for name, rule in RULES.items():
        bisection = Bisection(name)
        assert tuple(bisection.grid) == rule.grid and bisection.dense_value == rule.dense
        ordered = bisection.ordered
        assert ordered == rule.ordered(ordered) and ordered[-1] == rule.sparsest and rule.dense not in ordered
    assert Bisection("max_p").scan == [0.001, 0.0075, 0.03, 0.2, 1.0]  # in max_p's own unit, not p's grid


def test_a_curve_that_never_crosses_is_a_lower_bound_after_the_scan() -> None:
    bisection = run(Bisection("top_p", 0.01), lambda p: (1 - p, 0.995))
    assert list(bisection.points) == [0.98, 0.95, 0.91, 0.75, 0.5, 0.1, 0.0]
    found = bisection.critical()
    assert found.lower_bound and found.value == 1.0


def test_nan_performance_counts_as_below_and_sparsity_jumps_stop() -> None:
    # sparsity jumps from 0 to 0.8 at p = 0.5: no precision is reachable, the step limit stops it
    curve = lambda p: (0.8 if p < 0.5 else 0.0, math.nan if p < 0.5 else 1.0)  # noqa: E731
    on_grid = run(Bisection("top_p", 0.01), curve)
    assert list(on_grid.points) == [0.98, 0.95, 0.91, 0.75, 0.5, 0.1, 0.3, 0.4]  # the scan, then grid neighbours
    bisection = run(Bisection("top_p", 0.01, refine=True), curve)
    assert len(bisection.points) == 6 + 16  # the scan up to p = 0.1, then the step limit
    (ok_value, _), (bad_value, _) = bisection.bracket()
    assert bad_value < 0.5 <= ok_value and ok_value - bad_value < 1e-4 and bad_value == round(bad_value, 6)


def test_bisect_curves_asks_for_all_open_curves_at_once() -> None:
    curves = {("input", "top_p"): top_p_curve(0.3, 0.3, 2), ("intermediate", "top_p"): top_p_curve(0.3, 0.6, 2)}
    rounds: list[int] = []

    def measure(points):
        rounds.append(len(points))
        return {(t, r, v): curves[(t, r)](v) for t, r, v in points}

    found = bisect_curves(list(curves), measure, precision=0.02)
    assert rounds[0] == 2 and sum(rounds) == sum(len(b.points) for b in found.values())
    assert found[("input", "top_p")].critical().value == pytest.approx(0.3, abs=0.02)
    assert found[("intermediate", "top_p")].critical().value == pytest.approx(0.6, abs=0.02)


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="precision"):
        Bisection("top_p", 0.0)
    with pytest.raises(ValueError, match="unknown rule 'top_q'; choose one of top_p, top_k, max_p"):
        Bisection("top_q")
    with pytest.raises(ValueError, match=r"max_p value must lie in \[0, 1\], got 2"):
        Bisection("max_p", grid=[0.1, 2.0])


def test_bisect_sweep_on_a_tiny_model_stores_what_it_evaluated_resumes_and_reports_it(tmp_path) -> None:
    model, tokenizer = tiny_lm()
    task = tiny_task("mc", 16)
    common = dict(model="tiny", targets=["intermediate"], tasks=[task], limit=None, resamples=20, batch_size=16)
    grid = run_sweep(SweepConfig(out=tmp_path / "grid", values=PAPER, **common), model, tokenizer, show_progress=False)
    config = SweepConfig(out=tmp_path / "bisect", values=PAPER, search="bisect", precision=0.02, **common)
    summary = run_sweep(config, model, tokenizer, show_progress=False)

    evaluated = summary["search"]["evaluated"]["intermediate/top_p"]
    with RunStore.open(tmp_path / "bisect") as store:
        keys = store.keys()
    stored = sorted(k.value for k in keys if not k.is_dense)
    assert stored == sorted(v for v, _, _ in evaluated) and len(evaluated) <= len(PAPER) // 2
    found = critical_sparsity([s for _, s, _ in evaluated], [p for _, _, p in evaluated])
    critical = summary["critical_sparsity"]["intermediate/top_p"]
    assert critical["value"] == pytest.approx(found.value)  # the analysis of exactly these points
    # every value the grid shares with the search gave the same point (the tiny random model's curve is
    # noise around 99 %, so the two critical sparsities need not agree: the synthetic tests check accuracy)
    grid_points = {p["value"]: (p["sparsity"], p["normalized"]) for p in grid["points"]}
    shared = [(v, s, n) for v, s, n in evaluated if v in grid_points]
    assert len(shared) >= 5 and all(grid_points[v] == pytest.approx((s, n)) for v, s, n in shared)

    def rows() -> list[tuple]:
        with contextlib.closing(sqlite3.connect(tmp_path / "bisect" / "results.sqlite")) as db:
            return db.execute("SELECT id, value, task, created FROM points ORDER BY id").fetchall()

    before = rows()
    assert run_sweep(config, model, tokenizer, show_progress=False) == summary  # a rerun replays the stored points
    assert rows() == before  # and evaluates nothing
    assert grid["search"] == {"method": "grid"}

    write_report(tmp_path / "bisect")
    text = (tmp_path / "bisect" / "report.md").read_text()
    assert "Search: bisection" in text and ", ".join(f"{v:g}" for v, _, _ in evaluated) in text


def test_bad_search_settings_are_refused_before_any_model_work(tmp_path) -> None:
    for overrides, message in (
        (dict(search="golden"), "unknown search"),
        (dict(precision=1.5), "precision"),
        (dict(executor="local", gpus_per_point=1), "need --executor ray"),
        (dict(executor="dask"), "unknown executor"),
    ):
        with pytest.raises(ValueError, match=message):
            SweepConfig(out=tmp_path, tasks=[tiny_task("mc", 4)], **overrides).validate()
