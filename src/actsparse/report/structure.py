"""Figures of per-task and per-layer structure: heatmaps per task, densities of per-token sparsity,
retention of a transferred operating point, and per-layer sensitivity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from actsparse.report.plots import TARGET_COLORS

ROLE_COLORS = {"source": "#1f77b4", "destination": "#d62728"}


def _grid(ax: Any, grid: list[list[float]], xlabels: Sequence[str], ylabels: Sequence[str]) -> Any:
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100, origin="lower")
    ax.set_xticks(range(len(xlabels)), list(xlabels), rotation=45 if len(xlabels) > 6 else 0, fontsize=8)
    step = max(1, len(ylabels) // 15)
    ax.set_yticks(range(0, len(ylabels), step), [ylabels[i] for i in range(0, len(ylabels), step)])
    if len(xlabels) * len(ylabels) <= 200:
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
    return image


def sweep_task_heatmaps(points: dict[str, dict[float, dict[str, float]]], target: str, model: str) -> Figure:
    """One panel per task: per-layer sparsity (layer × top_p value) of `target` on that task alone.

    `points`: task → value → {layer: sparsity} (from a sweep's stored TaskResults)."""
    tasks = sorted(points)
    fig, axes = plt.subplots(1, len(tasks), figsize=(1.2 + 3.8 * len(tasks), 6.0), squeeze=False)
    image = None
    for ax, task in zip(axes[0], tasks, strict=True):
        values = sorted(points[task], reverse=True)
        layers = sorted({int(k) for v in values for k in points[task][v]})
        grid = [[100 * points[task][v].get(str(layer), math.nan) for v in values] for layer in layers]
        image = _grid(ax, grid, [f"{v:g}" for v in values], [str(layer) for layer in layers])
        ax.set_xlabel("top_p value")
        ax.set_ylabel("layer")
        ax.set_title(task, fontsize=11)
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="sparsity (%)", fraction=0.03)
    fig.suptitle(f"{model}: per-layer sparsity of {target}, per task", fontsize=12)
    return fig


def sweep_heatmap_data(store: Any, rule: str = "top_p") -> dict[str, dict[str, dict[float, dict[str, float]]]]:
    """target → task → value → {layer: sparsity} from a sweep's RunStore."""
    out: dict[str, dict[str, dict[float, dict[str, float]]]] = {}
    for key, result in store.items():
        if key.is_dense or key.rule != rule:
            continue
        per_layer = result.sparsity.get("all", {}).get("per_layer", {})
        if per_layer:
            out.setdefault(key.target, {}).setdefault(key.task, {})[key.value] = {
                str(k): float(v) for k, v in per_layer.items()
            }
    return out


def save_sweep_task_heatmaps(run_dir: str | Path) -> list[Path]:
    """heatmap_tasks_TARGET.png for every target of a sweep with more than one task; return the paths."""
    from actsparse.study.store import RunStore

    run_dir = Path(run_dir)
    with RunStore.open(run_dir, create=False) as store:
        data = sweep_heatmap_data(store)
        model = (store.get_meta("settings") or {}).get("model", "")
    paths = []
    for target, points in sorted(data.items()):
        if len(points) < 2:
            continue
        fig = sweep_task_heatmaps(points, target, str(model))
        path = run_dir / f"heatmap_tasks_{target}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def task_layer_heatmap(per_task: dict[str, dict[str, float]], title: str) -> Figure:
    """Rows: layers; columns: tasks; colour: the sparsity of each layer on each task at one fixed point."""
    tasks = list(per_task)
    layers = sorted({int(k) for t in tasks for k in per_task[t]})
    grid = [[100 * float(per_task[t].get(str(layer), math.nan)) for t in tasks] for layer in layers]
    fig, ax = plt.subplots(figsize=(2.0 + 1.1 * len(tasks), 6.0))
    image = _grid(ax, grid, tasks, [str(layer) for layer in layers])
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="sparsity (%)", fraction=0.05)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def densities(per_task: dict[str, np.ndarray], title: str) -> Figure:
    """Density of per-token sparsity, one curve per task (the paper's Figure 3b)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bins = np.linspace(0, 100, 81)
    for task, values in per_task.items():
        if len(values) == 0:
            continue
        hist, edges = np.histogram(100 * np.asarray(values), bins=bins, density=True)
        centers = (edges[:-1] + edges[1:]) / 2
        ax.plot(centers, hist, lw=1.5, label=f"{task} (median {100 * float(np.median(values)):.1f} %, n={len(values)})")
    ax.set_xlabel("per-token sparsity (%)")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def retention_figure(transfer: dict[str, Any]) -> Figure:
    """Retention per task at each target's fixed point, with its 95 % paired-bootstrap interval."""
    targets = list(transfer["retention"])
    fig, axes = plt.subplots(1, len(targets), figsize=(1.0 + 4.6 * len(targets), 4.2), squeeze=False, sharey=True)
    for ax, target in zip(axes[0], targets, strict=True):
        rows = transfer["retention"][target]
        tasks = list(rows)
        for i, task in enumerate(tasks):
            r = rows[task]
            if r["value"] is None:
                continue
            lo, hi = r["ci_low"] if r["ci_low"] is not None else r["value"], r["ci_high"] or r["value"]
            color = ROLE_COLORS[r["role"]]
            ax.errorbar(i, r["value"], yerr=[[r["value"] - lo], [hi - r["value"]]], fmt="o", color=color, capsize=4)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(0.99, color="gray", lw=0.8, ls="--")
        labels = [t + (" (bpb)" if rows[t]["measure"] == "bpb" else "") for t in tasks]
        ax.set_xticks(range(len(tasks)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{target}: {transfer['specs'][target]}", fontsize=10, color=TARGET_COLORS.get(target, "k"))
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("retention (sparse / dense; bpb: dense / sparse)")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=role) for role, c in ROLE_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8)
    fig.suptitle(f"{transfer['model']}: operating point fixed on {', '.join(transfer['sources'])}", fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return fig


def sensitivity_figure(layers: list[dict[str, Any]], title: str) -> Figure:
    """Sparsifying one layer at a time: mean KL to dense and loss of normalised performance per layer."""
    fig, (ax_kl, ax_loss) = plt.subplots(2, 1, figsize=(7.0, 6.0), sharex=True)
    xs = [r["layer"] for r in layers]
    tasks = sorted({t for r in layers for t in r["kl"]})
    for task in tasks:
        ax_kl.plot(xs, [r["kl"].get(task) or math.nan for r in layers], marker="o", ms=3, label=task)
        ax_loss.errorbar(
            xs,
            [100 * (1 - r["retention"][task]["value"]) for r in layers],
            yerr=[
                [100 * (r["retention"][task]["ci_high"] - r["retention"][task]["value"]) for r in layers],
                [100 * (r["retention"][task]["value"] - r["retention"][task]["ci_low"]) for r in layers],
            ],
            marker="o",
            ms=3,
            capsize=2,
            label=task,
        )
    ax_kl.set_ylabel("mean KL(dense ‖ sparse)")
    ax_kl.set_yscale("log")
    ax_loss.set_ylabel("loss of score (%)\n1 − sparse/dense")
    ax_loss.axhline(0, color="gray", lw=0.8)
    ax_loss.axhline(1, color="gray", lw=0.8, ls="--")
    ax_loss.set_xlabel("layer sparsified alone")
    ax_kl.legend(fontsize=7)
    for ax in (ax_kl, ax_loss):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
