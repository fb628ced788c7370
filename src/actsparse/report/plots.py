"""The report's figures, drawn from a summary (summary.json) with matplotlib's Agg backend."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from actsparse.report.outliers import mark_outlier_layers
from actsparse.report.reading import censored, reached, settled

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


def _task_ratio(p: dict[str, Any], task: str) -> float:
    value = p.get("normalized_per_task", {}).get(task)
    return math.nan if value is None else value


PAGE_WIDTH = 10.8
"""Inches: the report page's width (1200 px at DPI) that wide figures fill."""
DPI = 110


def _label_99(ax: Any) -> None:
    """The 99 % line, labelled outside the axes on the right, where it hides no curve."""
    ax.axhline(0.99, color="black", lw=0.9, ls="--", alpha=0.7)
    ax.text(1.01, 0.99, "99 %", transform=ax.get_yaxis_transform(), ha="left", va="center", fontsize=8, clip_on=False)


def _rail(ax: Any, rows: list[tuple[Any, dict[str, Any], tuple[bool, bool]]], used: set[str], height: float) -> None:
    """Critical sparsity of each curve on its own row of a rail below the curves (so that markers of close
    curves neither overlap each other nor hide the curves): its 95 % interval as a bar, dotted when censored,
    ★ at the value, ▶ for a lower bound. `height` is the rail's share of the axes height."""
    transform = ax.get_xaxis_transform()  # x in data, y in axes fractions
    step = height / (len(rows) + 1)
    for k, (color, c, (below, above)) in enumerate(rows):
        y = height - step * (k + 1)
        lo, hi = c.get("ci_low"), c.get("ci_high")
        if lo is not None and hi is not None:
            ax.plot(
                [100 * lo, 100 * hi], [y, y], ":" if below or above else "-", transform=transform, color=color, lw=2
            )
            if below or above:
                used.add("censored")
        marker = ">" if c["lower_bound"] else "*"
        used.add("bound" if c["lower_bound"] else "star")
        ax.plot(
            100 * c["value"], y, marker=marker, ms=9 if marker == "*" else 7, color=color, mec="black", mew=0.5,
            transform=transform, ls="none", zorder=5, clip_on=False,
        )  # fmt: skip
    if rows:
        ax.add_patch(Rectangle((0, 0), 1, height, transform=ax.transAxes, color="#f4f4f4", zorder=0, lw=0))


def _ylim(axes: Any, ys: list[float], rail: float) -> None:
    """Shared y range: every curve and band, with `rail` (a share of the axes height) below them."""
    low = max(0.0, min(0.95, min(ys, default=0.9) - 0.03))
    top = max(1.04, max(ys, default=1.0) + 0.02)
    bottom = low - rail * (top - low) / (1 - rail)
    axes[0, 0].set_ylim(bottom, top)
    ticks = [
        t for t in matplotlib.ticker.MaxNLocator(6, steps=[1, 2, 5, 10]).tick_values(low, top) if low - 1e-9 <= t <= top
    ]
    axes[0, 0].set_yticks(ticks)


def _legend(fig: Figure, entries: dict[str, Any], width: float) -> float:
    """A legend below the panels with only the entries used; returns the figure share it takes."""
    if not entries:
        return 0.02
    ncol = max(1, min(len(entries), int(width // 2.0)))
    fig.legend(
        list(entries.values()), list(entries), loc="lower center", ncol=ncol, frameon=False, bbox_to_anchor=(0.5, 0.0)
    )
    rows = math.ceil(len(entries) / ncol)
    return (0.12 + 0.27 * rows) / fig.get_figheight()


def _marker_entries(used: set[str]) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    if "band" in used:
        entries["95 % band (paired bootstrap)"] = Patch(color="gray", alpha=0.25, lw=0)
    if "star" in used:
        entries["critical sparsity, 95 % CI"] = Line2D([], [], marker="*", color="gray", ms=10, mec="black", lw=2)
    if "bound" in used:
        entries["lower bound (never crosses 99 %)"] = Line2D([], [], marker=">", color="gray", ms=7, ls="none")
    if "censored" in used:
        entries["censored interval"] = Line2D([], [], color="gray", ls=":", lw=2)
    return entries


def performance(
    summary: Summary, rules: tuple[str, ...] | None = None, title: str = "", panels: list[str] | None = None
) -> Figure:
    """Normalised performance vs achieved sparsity with 95 % bands of the same measure, a line per target,
    critical sparsity of each curve on a rail below the curves: one panel per entry of `panels` (the
    average over tasks and each task, by default)."""
    curves = {k: v for k, v in _curves(summary).items() if rules is None or k[1] in rules}
    multi_rule = len({r for _, r in curves}) > 1
    tasks = summary["tasks"]
    bands = summary.get("bands", {})
    if panels is None:
        panels = ["average", *tasks] if len(tasks) > 1 else tasks or ["average"]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    width = max(7.5, 4.6 * cols) if len(panels) > 1 else 8.5
    rail = min(0.4, 0.06 + 0.06 * len(curves))
    fig, axes = plt.subplots(rows, cols, figsize=(width, (3.6 + 0.25 * len(curves)) * rows + 0.9), squeeze=False)
    for ax in axes.flat[1:]:
        ax.sharey(axes.flat[0])
    ys: list[float] = []
    lines: dict[str, Any] = {}
    used: set[str] = set()
    for n, (ax, panel) in enumerate(zip(axes.flat, panels, strict=False)):
        marks = []
        for (target, rule), pts in curves.items():
            label = f"{target}/{rule}"
            key = "average" if panel == "average" else panel
            if panel == "average":
                xs = [p["sparsity"] for p in pts]
                perf = [p["normalized"] if p["normalized"] is not None else math.nan for p in pts]
                crit = summary["critical_sparsity"].get(label)
            else:
                xs = [p["sparsity_per_task"].get(panel, p["sparsity"]) for p in pts]
                perf = [_task_ratio(p, panel) for p in pts]
                crit = summary.get("critical_sparsity_per_task", {}).get(label, {}).get(panel)
            color = TARGET_COLORS.get(target, "gray")
            band = [(x, *bands[(target, rule, p["value"])][key]) for x, p in zip(xs, pts, strict=True)
                    if key in bands.get((target, rule, p["value"]), {})]  # fmt: skip
            if band:
                bx, lo, hi = zip(*[(0.0, 1.0, 1.0), *band], strict=True)
                ax.fill_between([100 * x for x in bx], lo, hi, color=color, alpha=0.15, lw=0)
                ys += [*lo, *hi]
                used.add("band")
            xs, perf = [0.0, *xs], [1.0, *perf]
            ys += [y for y in perf if not math.isnan(y)]
            (line,) = ax.plot(
                [100 * x for x in xs],
                perf,
                RULE_STYLES.get(rule, "-"),
                marker=RULE_MARKERS.get(rule, "o"),
                ms=3.5,
                color=color,
                lw=1.4,
                zorder=3,
            )
            lines.setdefault(f"{target} {rule}" if multi_rule else target, line)
            task = None if panel == "average" else panel
            if crit and crit.get("value") is not None and settled(summary, label, task):
                span = reached(summary, label, task)
                marks.append((color, crit, censored(crit, span)))
        _rail(ax, marks, used, rail)
        if n % cols == cols - 1 or n == len(panels) - 1:
            _label_99(ax)
        else:
            ax.axhline(0.99, color="black", lw=0.9, ls="--", alpha=0.7)
        name = "average over tasks" if panel == "average" else panel
        ax.set_title(name, fontsize=11, fontweight="bold" if panel == "average" else None)
        ax.set_xlabel("achieved sparsity (%)")
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        if n % cols:
            ax.tick_params(labelleft=False)
    for ax in axes[:, 0]:
        ax.set_ylabel("sparse / dense task metric")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    _ylim(axes, ys, rail)
    bottom = _legend(fig, {**lines, **_marker_entries(used)}, width)
    fig.suptitle(title or f"{summary.get('model')}: normalised performance vs achieved sparsity", fontsize=12)
    fig.tight_layout(rect=(0, bottom, 1, 0.96))
    return fig


def heatmap(summary: Summary, target: str) -> Figure:
    """Per-layer sparsity (value × layer) of one target, a panel per rule, as wide as the page."""
    curves = sorted((k, v) for k, v in _curves(summary).items() if k[0] == target)
    heights = [max(2, len(pts)) for _, pts in curves]
    fig, axes = plt.subplots(
        len(curves),
        1,
        figsize=(PAGE_WIDTH, 1.7 + sum(0.34 * h + 0.9 for h in heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    for ax, ((_, rule), pts) in zip(axes[:, 0], curves, strict=False):
        pts = sorted(pts, key=lambda p: -p["value"])
        layers = sorted({int(k) for p in pts for k in p["sparsity_per_layer"]})
        grid = [[100 * p["sparsity_per_layer"].get(str(layer), math.nan) for layer in layers] for p in pts]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
        ax.set_yticks(range(len(pts)), [f"{p['value']:g} ({100 * p['sparsity']:.0f} %)" for p in pts])
        step = max(1, math.ceil(len(layers) / 40))
        ax.set_xticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
        ax.set_xlabel("layer")
        ax.set_ylabel(f"{rule} value (sparsity)")
        mark_outlier_layers(ax, summary, target, layers)
        ax.set_title(f"{target} · {rule}", fontsize=11)
        if len(layers) * len(pts) <= 900:
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
        fig.colorbar(image, ax=ax, label="sparsity (%)", fraction=0.03, pad=0.01)
    tasks = summary.get("tasks", [])
    docs = sorted({n for t, n in summary.get("n_docs", {}).items() if t in tasks})
    pooled = (
        f"Share of the {target} entries that the rule zeroed in each layer, pooled over every real token "
        f"(prefill and decode; padding excluded) of the documents scored ({'/'.join(map(str, docs))} per task), "
        f"then averaged over {'the task' if len(tasks) == 1 else f'{len(tasks)} tasks'}: {', '.join(tasks)}."
    )
    fig.suptitle(f"{summary.get('model')}: per-layer sparsity of {target}", fontsize=12)
    fig.text(0.5, 0.01, textwrap.fill(pooled, 170), ha="center", va="bottom", fontsize=8.5)
    fig.tight_layout(rect=(0, 0.6 / fig.get_figheight(), 1, 1 - 0.3 / fig.get_figheight()))
    return fig


def critical_spread(summary: Summary) -> Figure:
    """Critical sparsity of each task (and the average) per (target, rule), with 95 % intervals."""
    per_task = {
        k: {t: c for t, c in v.items() if settled(summary, k, t)}
        for k, v in summary.get("critical_sparsity_per_task", {}).items()
        if settled(summary, k)
    }
    labels = sorted(per_task)
    tasks = summary["tasks"]
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH * 0.8, 1.4 + 0.75 * max(1, len(labels))))
    cmap = plt.get_cmap("tab10")
    series = [("average", summary["critical_sparsity"])] + [
        (t, {label: per_task[label].get(t) for label in labels}) for t in tasks
    ]
    offsets = [0.35 * (i / max(1, len(series) - 1) - 0.5) for i in range(len(series))]
    entries: dict[str, Any] = {}
    used: set[str] = set()
    for k, ((name, by_label), dy) in enumerate(zip(series, offsets, strict=False)):
        color = "black" if name == "average" else cmap((k - 1) % 10)
        for i, label in enumerate(labels):
            c = by_label.get(label)
            if not c or c.get("value") is None:
                continue
            y = i + dy
            lo, hi = c.get("ci_low"), c.get("ci_high")
            below, above = censored(c, reached(summary, label, None if name == "average" else name))
            if lo is not None and hi is not None:
                ax.plot([100 * lo, 100 * hi], [y, y], ":" if below or above else "-", color=color, lw=1.6, alpha=0.8)
                if below or above:
                    used.add("censored")
            if c["lower_bound"]:
                used.add("bound")
            ax.plot(
                100 * c["value"],
                y,
                marker=">" if c["lower_bound"] else ("D" if name == "average" else "o"),
                color=color,
                ms=8 if name == "average" else 6,
                ls="none",
            )
            entries.setdefault(name, Line2D([], [], marker="D" if k == 0 else "o", color=color, ls="none"))
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first label on top, room for every offset
    ax.set_xlabel("critical sparsity (%)  ·  bars: 95 % paired-bootstrap interval")
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    entries |= {k: v for k, v in _marker_entries(used).items()}
    if entries:
        ax.legend(list(entries.values()), list(entries), loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(f"{summary.get('model')}: critical sparsity per task", fontsize=12)
    fig.tight_layout()
    return fig


def rules_compared(summary: Summary, rules: tuple[str, ...]) -> Figure:
    """Average normalised performance of each rule, one panel per target (e.g. top-p against max-p)."""
    curves = _curves(summary)
    bands = summary.get("bands", {})
    targets = sorted({t for t, r in curves if r in rules}, key=list(TARGET_COLORS).index)
    cols = min(4, len(targets))
    rows = math.ceil(len(targets) / cols)
    width = max(7.5, 4.2 * cols)
    rail = min(0.3, 0.06 + 0.06 * len(rules))
    fig, axes = plt.subplots(rows, cols, figsize=(width, 3.7 * rows + 0.8), squeeze=False)
    for ax in axes.flat[1:]:
        ax.sharey(axes.flat[0])
    ys = [1.0]
    lines: dict[str, Any] = {}
    used: set[str] = set()
    for n, (ax, target) in enumerate(zip(axes.flat, targets, strict=False)):
        marks = []
        for k, rule in enumerate(rules):
            pts = curves.get((target, rule), [])
            color = plt.get_cmap("tab10")(k)
            band = [(p["sparsity"], *bands[(target, rule, p["value"])]["average"]) for p in pts
                    if "average" in bands.get((target, rule, p["value"]), {})]  # fmt: skip
            if band:
                bx, lo, hi = zip(*[(0.0, 1.0, 1.0), *band], strict=True)
                ax.fill_between([100 * x for x in bx], lo, hi, color=color, alpha=0.15, lw=0)
                ys += [*lo, *hi]
                used.add("band")
            xs = [0.0] + [100 * p["sparsity"] for p in pts]
            perf = [1.0] + [p["normalized"] if p["normalized"] is not None else math.nan for p in pts]
            ys += [y for y in perf if not math.isnan(y)]
            if pts:
                (line,) = ax.plot(
                    xs, perf, RULE_STYLES.get(rule, "-"), marker=RULE_MARKERS.get(rule, "o"), ms=3.5, color=color
                )
                lines.setdefault(rule, line)
            crit = summary["critical_sparsity"].get(f"{target}/{rule}")
            if crit and crit.get("value") is not None and settled(summary, f"{target}/{rule}"):
                marks.append((color, crit, censored(crit, reached(summary, f"{target}/{rule}"))))
        _rail(ax, marks, used, rail)
        if n % cols == cols - 1 or n == len(targets) - 1:
            _label_99(ax)
        else:
            ax.axhline(0.99, color="black", lw=0.9, ls="--", alpha=0.7)
        ax.set_title(target, fontsize=11)
        ax.set_xlabel("achieved sparsity (%)")
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        if n % cols:
            ax.tick_params(labelleft=False)
    for ax in list(axes.flat)[len(targets) :]:
        ax.axis("off")
    axes[0, 0].set_ylabel("normalised performance")
    _ylim(axes, ys, rail)
    bottom = _legend(fig, {**lines, **_marker_entries(used)}, width)
    fig.suptitle(f"{summary.get('model')}: {' against '.join(rules)} (average over tasks)")
    fig.tight_layout(rect=(0, bottom, 1, 0.95))
    return fig


def figures(summary: Summary) -> dict[str, Callable[[], Figure]]:
    """The report's figures by file name (drawn lazily), those that the summary has data for."""
    curves = _curves(summary)
    out: dict[str, Callable[[], Figure]] = {}
    if not curves:
        return out
    rules = sorted({r for _, r in curves})
    out["critical_sparsity.png"] = lambda: performance(
        summary, title=f"{summary.get('model')}: normalised performance (task metric) vs achieved sparsity",
        panels=["average"],
    )  # fmt: skip
    if len(summary["tasks"]) > 1:
        out["performance.png"] = lambda: performance(summary, title="per task", panels=list(summary["tasks"]))
    for target in sorted({t for t, _ in curves}, key=list(TARGET_COLORS).index):
        out[f"heatmap_{target}.png"] = lambda target=target: heatmap(summary, target)  # type: ignore[misc]
    if any(settled(summary, label) for label in summary.get("critical_sparsity_per_task", {})):
        out["critical_per_task.png"] = lambda: critical_spread(summary)
    if "top_p" in rules and "max_p" in rules:
        out["top_p_vs_max_p.png"] = lambda: rules_compared(summary, ("top_p", "max_p"))
    return out


def save(draws: Mapping[str, Callable[[], Figure]], folder: Path) -> list[Path]:
    """Draw each figure and write it into `folder` as PNG under its name; return the paths."""
    paths = []
    for name, draw in draws.items():
        fig = draw()
        try:
            fig.savefig(folder / name, dpi=DPI)
        finally:
            plt.close(fig)
        paths.append(folder / name)
    return paths


def save_figures(summary: Summary, folder: Path) -> list[Path]:
    """Draw every figure of the summary into `folder` as PNG; return the paths."""
    return save(figures(summary), folder)
