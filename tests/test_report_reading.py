"""The report a researcher reads: bands on the curves, censored intervals flagged, 'dense' as the last grid
point, a partial run naming its missing points, nothing hiding the curves, legends with only what is drawn."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from actsparse.analysis import point_bands as bands
from actsparse.evaluate.results import DocResult, TaskResult
from actsparse.report import plots, render, tables, write_report
from actsparse.report.reading import censored, missing
from actsparse.study.store import PointKey, RunStore

CRIT = "Critical sparsity"


def _point(target: str, value: float, sparsity: float, normalized: float, tasks=("a",), rule="top_p") -> dict:
    return {
        "target": target,
        "rule": rule,
        "value": value,
        "sparsity": sparsity,
        "sparsity_per_layer": {"0": sparsity, "1": sparsity},
        "scores": {t: 0.5 * normalized for t in tasks},
        "normalized": normalized,
        "kl": None,
        "agreement": None,
        "sparsity_per_task": {t: sparsity for t in tasks},
        "complete": True,
    }


def _crit(value, lo, hi, lower=False, grid_param=None, grid_value=0.0) -> dict:
    return {
        "value": value,
        "grid_value": grid_value,
        "ci_low": lo,
        "ci_high": hi,
        "lower_bound": lower,
        "grid_param": grid_param,
    }


def _summary(**extra) -> dict:
    critical = {
        "input/top_p": _crit(0.011, 0.005, 0.267),  # crosses before the first point: grid = dense
        "intermediate/top_p": _crit(0.393, 0.374, 0.57, grid_param=0.95, grid_value=0.366),
    }
    summary = {
        "model": "m",
        "tasks": ["a"],
        "splits": {"a": "validation"},
        "metrics": {"a": "acc"},
        "n_docs": {"a": 10},
        "dense": {"a": 0.5},
        "points": [
            _point("input", 0.95, 0.26, 0.77),
            _point("input", 0.85, 0.45, 0.54),
            _point("intermediate", 0.95, 0.37, 1.0),
            _point("intermediate", 0.85, 0.57, 0.92),
        ],
        "critical_sparsity": critical,
        "critical_sparsity_per_task": {label: {"a": c} for label, c in critical.items()},  # one task: the same
    }
    return summary | extra


def test_last_grid_point_reads_dense_and_censored_intervals_are_flagged() -> None:
    rows = {r[0]: r for r in tables(_summary())[CRIT][1]}
    assert rows["input/top_p"][2] == "dense"
    assert rows["intermediate/top_p"][2] == "36.6 % (at 0.95)"
    assert rows["input/top_p"][1].endswith("[0.5 %, 26.7 %] (censored below)")  # below the lowest point (26 %)
    assert rows["intermediate/top_p"][1].endswith("[37.4 %, 57.0 %] (censored above)")  # at the highest reached
    assert censored(_crit(0.5, 0.4, 0.5), (0.3, 0.6)) == (False, False)
    assert censored(_crit(0.5, 0.4, 0.5), None) == (False, False)
    md, _ = render(_summary(), [])
    assert "censored" in md


def _result(task: str, scores: list[float], sparsity: float) -> TaskResult:
    docs = [DocResult(i, s) for i, s in enumerate(scores)]
    return TaskResult(task, "validation", "acc", docs, {"all": {"sparsity": sparsity, "per_layer": {"0": sparsity}}})


def _partial_run(out: Path) -> None:
    rng = np.random.default_rng(0)
    dense = {t: rng.integers(0, 2, 40).astype(float).tolist() for t in ("a", "b")}
    with RunStore.open(out) as store:
        store.set_meta("settings", {"model": "m", "limit": None, "seed": 0, "tasks": ["a", "b"]})
        store.set_meta("planned", [["input", "top_p", 1.0], ["input", "top_p", 0.9], ["input", "top_p", 0.8]])
        for t in ("a", "b"):
            store.put(PointKey.dense(t), _result(t, dense[t], 0.0))
        store.put(PointKey("input", "top_p", 1.0, "a"), _result("a", dense["a"], 0.0))  # p = 1: nothing zeroed
        store.put(PointKey("input", "top_p", 1.0, "b"), _result("b", dense["b"], 0.0))
        store.put(PointKey("input", "top_p", 0.9, "a"), _result("a", dense["a"], 0.3))


def test_a_partial_run_names_its_missing_points_instead_of_a_lower_bound(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _partial_run(out)
    write_report(out, resamples=20)
    md = (out / "report.md").read_text()
    assert "≥ 0.0 %" not in md
    assert "| input/top_p | incomplete: 3 missing (see Missing points) |" in md
    assert "## Missing points" in md and "| input/top_p | 0.9 (b); 0.8 (every task) |" in md
    assert "This run is incomplete: 3 (point, task) results are missing" in md
    assert (out / "performance.png").exists()


def test_missing_without_a_recorded_plan_uses_the_incomplete_points() -> None:
    summary = _summary(tasks=["a", "b"])
    summary["points"] = [_point("input", 0.95, 0.3, 0.9, ("a",)), _point("input", 0.85, 0.5, 0.8, ("a", "b"))]
    assert missing(summary) == {"input/top_p": [(0.95, ["b"])]}
    assert missing(summary | {"planned": [["gate", "top_p", 0.9]]})["gate/top_p"] == [(0.9, ["a", "b"])]


def test_bands_are_paired_bootstrap_intervals_of_each_point(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    dense = rng.integers(0, 2, 60).astype(float)
    dense[:2] = 1.0
    with RunStore.open(tmp_path) as store:
        store.put(PointKey.dense("a"), _result("a", dense.tolist(), 0.0))
        store.put(PointKey("input", "top_p", 0.9, "a"), _result("a", dense.tolist(), 0.3))  # same answers
        worse = dense.copy()
        worse[dense == 1][:10] = 0.0
        worse[np.flatnonzero(dense == 1)[:10]] = 0.0
        store.put(PointKey("input", "top_p", 0.5, "a"), _result("a", worse.tolist(), 0.6))
        got = bands(store, ["a"], resamples=400)
    assert got[("input", "top_p", 0.9)]["a"] == (1.0, 1.0) == got[("input", "top_p", 0.9)]["average"]
    lo, hi = got[("input", "top_p", 0.5)]["a"]
    ratio = worse.mean() / dense.mean()
    assert lo < ratio < hi < 1.0


def _drawn(summary: dict) -> tuple[plt.Figure, list[str]]:
    fig = plots.performance(summary)
    return fig, [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_performance_curves_have_bands_and_legends_list_only_what_is_drawn() -> None:
    summary = _summary()
    fig, labels = _drawn(summary)
    assert "lower bound (never crosses 99 %)" not in labels and "95 % band (paired bootstrap)" not in labels
    assert {"input", "intermediate", "critical sparsity, 95 % CI", "censored interval"} <= set(labels)
    assert not [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
    plt.close(fig)

    summary["bands"] = {(p["target"], "top_p", p["value"]): {"a": (0.4, 1.0)} for p in summary["points"]}
    bound = _crit(0.3, 0.3, 0.3, lower=True)
    summary["critical_sparsity"]["input/top_p"] = summary["critical_sparsity_per_task"]["input/top_p"]["a"] = bound
    fig, labels = _drawn(summary)
    assert {"lower bound (never crosses 99 %)", "95 % band (paired bootstrap)"} <= set(labels)
    assert len([c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]) == 2
    plt.close(fig)


def test_the_99_label_and_the_critical_markers_leave_the_curves_free() -> None:
    summary = _summary()
    same = _crit(0.393, 0.374, 0.4)  # the same value as intermediate's
    summary["critical_sparsity"]["input/top_p"] = summary["critical_sparsity_per_task"]["input/top_p"]["a"] = same
    fig = plots.performance(summary)
    ax = fig.axes[0]
    (label,) = [t for t in ax.texts if t.get_text().strip() == "99 %"]
    assert label.get_position()[0] > 1.0, "the 99 % label sits outside the axes"
    stars = [line for line in ax.lines if line.get_marker() in ("*", ">")]
    assert len(stars) == 2
    heights = [line.get_ydata()[0] for line in stars]
    assert len(set(heights)) == 2, "markers of curves with the same critical sparsity do not overlap"
    curve_bottom = min(y for line in ax.lines if line.get_marker() == "o" for y in line.get_ydata())
    rail_top = ax.transData.inverted().transform(ax.transAxes.transform((0, max(heights))))[1]
    assert rail_top < curve_bottom, "the markers sit on a rail below every curve"
    plt.close(fig)


def test_heatmap_says_what_it_pools_over_and_uses_the_page_width() -> None:
    fig = plots.heatmap(_summary(), "input")
    text = " ".join(t.get_text() for t in fig.texts)
    assert "pooled over every real token (prefill and decode; padding excluded)" in " ".join(text.split())
    assert "averaged over the task: a" in " ".join(text.split())
    assert fig.get_figwidth() == pytest.approx(plots.PAGE_WIDTH)
    plt.close(fig)


def test_one_figure_saving_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from actsparse.report import diffusion

    saved: list[str] = []
    real = plots.save
    monkeypatch.setattr(plots, "save", lambda draws, folder: saved.extend(draws) or real(draws, folder))
    monkeypatch.setattr(diffusion, "save", plots.save)
    with RunStore.open(tmp_path) as store:
        result = _result("a", [1.0, 0.0], 0.3)
        result.sparsity["steps"] = {"sparsity": {"0": 0.3, "1": 0.4}, "jaccard_prev": {"1": 0.9}}
        store.put(PointKey("input", "top_p", 0.9, "a"), result)
    paths = diffusion.save_step_figures(tmp_path)
    assert saved == ["step_sparsity.png", "step_stability.png"] == [p.name for p in paths]
    plots.save_figures(_summary(), tmp_path)
    assert "critical_sparsity.png" in saved


def test_missing_points_beyond_the_crossing_leave_it_settled() -> None:
    beyond = _summary(planned=[["intermediate", "top_p", 0.5]])  # crosses at 0.85: 0.5 cannot move it
    row = {r[0]: r for r in tables(beyond)[CRIT][1]}["intermediate/top_p"]
    assert row[1].startswith("39.3 % [37.4 %") and row[1].endswith("(1 missing beyond the crossing)")
    between = _summary(planned=[["intermediate", "top_p", 0.9]])  # between 0.95 and the crossing at 0.85
    row = {r[0]: r for r in tables(between)[CRIT][1]}["intermediate/top_p"]
    assert row[1:3] == ["incomplete: 1 missing (see Missing points)", "–"]
