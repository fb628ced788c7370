"""Figures for diffusion models: sparsity per denoising step, and keep-mask stability across steps.

Read from the per-step statistics that `SparsityStats.to_dict()["steps"]` stores with each sparse
point of a sweep, averaged over its tasks (for multiple choice a step is one Monte-Carlo sample, for
generation one unmasking step); a sweep of an autoregressive model has none, and no figure is drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from actsparse.report.plots import TARGET_COLORS, save

StepCurves = dict[str, dict[str, dict[int, float]]]
"""point label → series name (sparsity, jaccard_prev, jaccard_first) → step → value."""

SERIES = ("sparsity", "jaccard_prev", "jaccard_first")


def step_curves(points: list[tuple[str, dict[str, Any]]]) -> StepCurves:
    """Per-step series of each point, averaged over its tasks: `points` are (label, sparsity dict) pairs."""
    sums: dict[str, dict[str, dict[int, list[float]]]] = {}
    for label, sparsity in points:
        steps = sparsity.get("steps")
        if not steps:
            continue
        for series in SERIES:
            for step, value in steps.get(series, {}).items():
                sums.setdefault(label, {}).setdefault(series, {}).setdefault(int(step), []).append(float(value))
    return {
        label: {name: {s: sum(v) / len(v) for s, v in sorted(by_step.items())} for name, by_step in series.items()}
        for label, series in sums.items()
    }


def _color(label: str) -> str:
    return TARGET_COLORS.get(label.split("/")[0], "gray")


STYLES = ("-", "--", ":", "-.")


def _plot(ax: Any, curves: StepCurves, series: str, ylabel: str) -> None:
    seen: dict[str, int] = {}
    for label, data in curves.items():
        target = label.split("/")[0]
        style = STYLES[seen.get(target, 0) % len(STYLES)]  # points of one target: one color, varied lines
        seen[target] = seen.get(target, 0) + 1
        by_step = data.get(series, {})
        if by_step:
            ax.plot(list(by_step), list(by_step.values()), style, marker=".", color=_color(label), label=label)
    ax.set_xlabel("denoising step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def sparsity_figure(curves: StepCurves) -> Figure:
    """Achieved sparsity at each denoising step, a line per sweep point."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    _plot(ax, curves, "sparsity", "sparsity")
    ax.set_title("Sparsity per denoising step")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def stability_figure(curves: StepCurves) -> Figure:
    """Jaccard of each step's keep-masks with the previous step's and with the first step's."""
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 4.0), sharey=True)
    _plot(axes[0], curves, "jaccard_prev", "Jaccard index")
    axes[0].set_title("Keep-mask vs previous step")
    _plot(axes[1], curves, "jaccard_first", "Jaccard index")
    axes[1].set_title("Keep-mask vs first step")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def save_step_figures(run_dir: str | Path) -> list[Path]:
    """Write step_sparsity.png and step_stability.png into `run_dir` when its points have per-step
    statistics (diffusion models); return their paths (none otherwise)."""
    from actsparse.study.store import RunStore

    run_dir = Path(run_dir)
    with RunStore.open(run_dir, create=False) as store:
        points = [
            (f"{key.target}/{key.rule}={key.value:g}", result.sparsity)
            for key, result in sorted(store.items(), key=lambda kv: (kv[0].target, kv[0].rule, -kv[0].value))
            if not key.is_dense
        ]
    curves = step_curves(points)
    if not curves:
        return []
    return save(
        {"step_sparsity.png": lambda: sparsity_figure(curves), "step_stability.png": lambda: stability_figure(curves)},
        run_dir,
    )
