"""The report's figures, drawn from a summary (summary.json) with matplotlib's Agg backend."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from actsparse.report.outliers import mark_outlier_layers

TARGET_COLORS = {
    "input": "#1f77b4",
    "gate": "#2ca02c",
    "up": "#9467bd",
    "intermediate": "#d62728",
    "all_inputs": "#ff7f0e",
}
RULE_STYLES = {"top_p": "-", "max_p": "--", "top_k": ":"}
RULE_MARKERS = {"top_p": "o", "max_p": "s", "top_k": "^"}

Summary = dict[str, Any]


def _curves(summary: Summary) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Complete points grouped by (target, rule), in order of increasing sparsity."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in summary["points"]:
        if p.get("complete", True) and p["sparsity"] is not None:
            out.setdefault((p["target"], p["rule"]), []).append(p)
    for pts in out.values():
        pts.sort(key=lambda p: p["sparsity"])
    return out


def _task_ratio(p: dict[str, Any], task: str, dense: dict[str, float]) -> float:
    d = dense.get(task)
    s = p["scores"].get(task)
    return s / d if d and s is not None else math.nan


def performance(summary: Summary, rules: tuple[str, ...] | None = None, title: str = "") -> Figure:
    """Normalised performance vs achieved sparsity: the average and one panel per task, a line per target."""
    curves = {k: v for k, v in _curves(summary).items() if rules is None or k[1] in rules}
    multi_rule = len({r for _, r in curves}) > 1
    tasks = summary["tasks"]
    panels = ["average", *tasks] if len(tasks) > 1 else tasks or ["average"]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False, sharey=True)
    lows = []
    for ax, panel in zip(axes.flat, panels, strict=False):
        for (target, rule), pts in curves.items():
            if panel == "average":
                xs = [p["sparsity"] for p in pts]
                ys = [p["normalized"] if p["normalized"] is not None else math.nan for p in pts]
                crit = summary["critical_sparsity"].get(f"{target}/{rule}")
            else:
                xs = [p["sparsity_per_task"].get(panel, p["sparsity"]) for p in pts]
                ys = [_task_ratio(p, panel, summary["dense"]) for p in pts]
                crit = summary.get("critical_sparsity_per_task", {}).get(f"{target}/{rule}", {}).get(panel)
            xs, ys = [0.0, *xs], [1.0, *ys]
            lows += [y for y in ys if not math.isnan(y)]
            color = TARGET_COLORS.get(target, "gray")
            label = f"{target} {rule}" if multi_rule else target
            ax.plot(
                [100 * x for x in xs],
                ys,
                RULE_STYLES.get(rule, "-"),
                marker=RULE_MARKERS.get(rule, "o"),
                ms=3.5,
                color=color,
                label=label,
                lw=1.4,
            )
            if crit and crit.get("value") is not None:
                ax.plot(
                    100 * crit["value"],
                    0.99,
                    marker=">" if crit["lower_bound"] else "*",
                    ms=13,
                    color=color,
                    markeredgecolor="black",
                    markeredgewidth=0.7,
                    zorder=5,
                    linestyle="none",
                )
        ax.axhline(0.99, color="black", lw=0.9, ls="--", alpha=0.7)
        ax.text(0.01, 0.99, " 99 %", transform=ax.get_yaxis_transform(), va="bottom", fontsize=8)
        name = "average over tasks" if panel == "average" else panel
        ax.set_title(name, fontsize=11, fontweight="bold" if panel == "average" else None)
        ax.set_xlabel("achieved sparsity (%)")
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    for ax in axes[:, 0]:
        ax.set_ylabel("score / dense score")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    low = min(lows, default=0.9)
    axes[0, 0].set_ylim(max(0.0, min(0.95, low - 0.03)), max(1.06, max(lows, default=1.0) + 0.02))
    handles, labels = axes.flat[0].get_legend_handles_labels()
    star = plt.Line2D([], [], marker="*", color="gray", ms=11, ls="none", markeredgecolor="black")
    bound = plt.Line2D([], [], marker=">", color="gray", ms=9, ls="none", markeredgecolor="black")
    fig.legend(
        [*handles, star, bound],
        [*labels, "critical sparsity", "lower bound (never crosses)"],
        loc="lower center",
        ncol=min(6, len(handles) + 2),
        frameon=False,
        bbox_to_anchor=(0.5, 0.0),
    )
    fig.suptitle(title or f"{summary.get('model')}: normalised performance vs achieved sparsity", fontsize=12)
    fig.tight_layout(rect=(0, 0.08 if rows == 1 else 0.05, 1, 0.96))
    return fig


def heatmap(summary: Summary, target: str) -> Figure:
    """Per-layer sparsity (layer × value) of one target, a panel per rule."""
    curves = {k: v for k, v in _curves(summary).items() if k[0] == target}
    fig, axes = plt.subplots(1, len(curves), figsize=(1.2 + 4.2 * len(curves), 6.4), squeeze=False)
    for ax, ((_, rule), pts) in zip(axes[0], sorted(curves.items()), strict=False):
        pts = sorted(pts, key=lambda p: -p["value"])
        layers = sorted({int(k) for p in pts for k in p["sparsity_per_layer"]})
        grid = [[100 * p["sparsity_per_layer"].get(str(layer), math.nan) for p in pts] for layer in layers]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100, origin="lower")
        ax.set_xticks(range(len(pts)), [f"{p['value']:g}" for p in pts], rotation=45 if len(pts) > 8 else 0)
        step = max(1, len(layers) // 15)
        ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
        ax.set_xlabel(f"{rule} value")
        ax.set_ylabel("layer")
        mark_outlier_layers(ax, summary, target, layers)
        ax.set_title(f"{target} · {rule}", fontsize=11)
        if len(layers) * len(pts) <= 200:
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
        fig.colorbar(image, ax=ax, label="sparsity (%)", fraction=0.05)
    fig.suptitle(f"{summary.get('model')}: per-layer sparsity of {target}", fontsize=12)
    fig.tight_layout()
    return fig


def critical_spread(summary: Summary) -> Figure:
    """Critical sparsity of each task (and the average) per (target, rule), with 95 % intervals."""
    per_task = summary.get("critical_sparsity_per_task", {})
    labels = sorted(per_task)
    tasks = summary["tasks"]
    fig, ax = plt.subplots(figsize=(8.5, 1.2 + 0.75 * max(1, len(labels))))
    cmap = plt.get_cmap("tab10")
    series = [("average", summary["critical_sparsity"])] + [
        (t, {label: per_task[label].get(t) for label in labels}) for t in tasks
    ]
    offsets = [0.35 * (i / max(1, len(series) - 1) - 0.5) for i in range(len(series))]
    for k, ((name, by_label), dy) in enumerate(zip(series, offsets, strict=False)):
        color = "black" if name == "average" else cmap((k - 1) % 10)
        for i, label in enumerate(labels):
            c = by_label.get(label)
            if not c or c.get("value") is None:
                continue
            y = i + dy
            lo, hi = c.get("ci_low"), c.get("ci_high")
            if lo is not None and hi is not None:
                ax.plot([100 * lo, 100 * hi], [y, y], color=color, lw=1.6, alpha=0.8)
            ax.plot(
                100 * c["value"],
                y,
                marker=">" if c["lower_bound"] else ("D" if name == "average" else "o"),
                color=color,
                ms=8 if name == "average" else 6,
                ls="none",
            )
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first label on top, room for every offset
    ax.set_xlabel("critical sparsity (%)  ·  bars: 95 % paired-bootstrap interval  ·  ▶ lower bound")
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    handles = [
        plt.Line2D([], [], marker="D" if k == 0 else "o", color="black" if k == 0 else cmap((k - 1) % 10), ls="none")
        for k in range(len(series))
    ]
    ax.legend(handles, [name for name, _ in series], loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(f"{summary.get('model')}: critical sparsity per task", fontsize=12)
    fig.tight_layout()
    return fig


def rules_compared(summary: Summary, rules: tuple[str, ...]) -> Figure:
    """Average normalised performance of each rule, one panel per target (e.g. top-p against max-p)."""
    curves = _curves(summary)
    targets = sorted({t for t, r in curves if r in rules}, key=list(TARGET_COLORS).index)
    cols = min(4, len(targets))
    rows = math.ceil(len(targets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.5 * rows), squeeze=False, sharey=True)
    lows = [1.0]
    for ax, target in zip(axes.flat, targets, strict=False):
        for k, rule in enumerate(rules):
            pts = curves.get((target, rule), [])
            xs = [0.0] + [100 * p["sparsity"] for p in pts]
            ys = [1.0] + [p["normalized"] if p["normalized"] is not None else math.nan for p in pts]
            lows += [y for y in ys if not math.isnan(y)]
            color = plt.get_cmap("tab10")(k)
            ax.plot(
                xs, ys, RULE_STYLES.get(rule, "-"), marker=RULE_MARKERS.get(rule, "o"), ms=3.5, color=color, label=rule
            )
            crit = summary["critical_sparsity"].get(f"{target}/{rule}")
            if crit and crit.get("value") is not None:
                marker = ">" if crit["lower_bound"] else "*"
                ax.plot(
                    100 * crit["value"], 0.99, marker=marker, ms=13, color=color, markeredgecolor="black", ls="none"
                )
        ax.axhline(0.99, color="black", lw=0.9, ls="--", alpha=0.7)
        ax.set_title(target, fontsize=11)
        ax.set_xlabel("achieved sparsity (%)")
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    for ax in list(axes.flat)[len(targets) :]:
        ax.axis("off")
    axes[0, 0].set_ylabel("normalised performance")
    axes[0, 0].set_ylim(max(0.0, min(0.95, min(lows) - 0.03)), max(1.06, max(lows) + 0.02))
    axes[0, 0].legend(loc="lower left", fontsize=9)
    fig.suptitle(f"{summary.get('model')}: {' against '.join(rules)} (average over tasks; ★ critical sparsity)")
    fig.tight_layout()
    return fig


def figures(summary: Summary) -> dict[str, Callable[[], Figure]]:
    """The report's figures by file name (drawn lazily), those that the summary has data for."""
    curves = _curves(summary)
    out: dict[str, Callable[[], Figure]] = {}
    if not curves:
        return out
    rules = sorted({r for _, r in curves})
    out["performance.png"] = lambda: performance(summary)
    for target in sorted({t for t, _ in curves}, key=list(TARGET_COLORS).index):
        out[f"heatmap_{target}.png"] = lambda target=target: heatmap(summary, target)  # type: ignore[misc]
    if summary.get("critical_sparsity_per_task"):
        out["critical_per_task.png"] = lambda: critical_spread(summary)
    if "top_p" in rules and "max_p" in rules:
        out["top_p_vs_max_p.png"] = lambda: rules_compared(summary, ("top_p", "max_p"))
    return out


def save_figures(summary: Summary, folder: Path) -> list[Path]:
    """Draw every figure into `folder` as PNG; return the paths."""
    paths = []
    for name, draw in figures(summary).items():
        fig = draw()
        path = folder / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
