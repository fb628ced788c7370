"""`actsparse report --compare RUN_A RUN_B ...`: several sweeps side by side.

The curves of every run on one plot (a panel per target), critical sparsity side by side, and, where
two runs share tasks and documents, the difference of their critical sparsity with a paired-bootstrap
interval: each resample draws the shared documents of each task once, for both runs, so that "model B
tolerates more than model A" is read with its uncertainty.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from actsparse.analysis.curves import THRESHOLD, Criterion, Curve, analyse_curve, build_curve, paired_difference
from actsparse.analysis.damage import MATCHED_SPARSITIES, PROXIES, matched_difference, verdict
from actsparse.analysis.statistics import LEVEL, RESAMPLES, draw_weights
from actsparse.analysis.summary import Grouped, curves, grouped_results, write_summary
from actsparse.study.store import RunStore, atomic_path

RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f")


@dataclass
class Run:
    """One sweep folder: its label, summary, its results by point, and per (target, rule) the curve with
    its documents."""

    label: str
    path: Path
    summary: dict[str, Any]
    grouped: Grouped
    curves: dict[tuple[str, str], Curve]
    doc_ids: dict[str, list[int]]  # task → the documents behind every curve (sorted)

    def curve(self, key: tuple[str, str], measure: str, within: dict[str, list[int]]) -> Curve:
        """The curve of `key` on a measure, over the tasks and documents of `within`."""
        dense, sparse = self.grouped
        values = self.curves[key].params
        criterion = Criterion.of(measure)
        return build_curve(
            *key,
            values,
            {t: dense[t] for t in within},
            {t: [sparse[(*key, v)][t] for v in values] for t in within},
            criterion,
            within,
        )[0]


def load_run(path: str | Path, resamples: int = RESAMPLES) -> Run:
    """Summarise a sweep folder (summary.json is rewritten) and gather its paired per-document scores."""
    path = Path(path)
    with RunStore.open(path, create=False) as store:
        seed = int((store.get_meta("settings") or {}).get("seed") or 0)
        grouped = grouped_results(store)
    summary = write_summary(path, resamples=resamples, seed=seed)
    if not summary["dense"]:
        raise ValueError(f"{path} has no dense baseline yet")
    built = curves(grouped, summary["tasks"])
    doc_ids: dict[str, list[int]] = {}
    for t in summary["tasks"]:  # the documents every curve pairs
        shared = {d.doc_id for d in grouped[0][t].docs}
        for _, ids in built.values():
            shared &= set(ids[t])
        doc_ids[t] = sorted(shared)
    return Run(
        str(summary.get("model") or path.name), path, summary, grouped, {k: c for k, (c, _) in built.items()}, doc_ids
    )


def _labels(runs: Sequence[Run]) -> None:
    """Unique labels: the model, with the folder name where two runs share a model."""
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = f"{r.label} ({r.path.name})"


def critical_difference(
    a: Run, b: Run, key: tuple[str, str], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> dict[str, Any] | None:
    """Critical sparsity of B minus A on the tasks and documents both have, with a paired-bootstrap
    interval (the same document draw for both runs), and their damage at matched sparsity; None when
    they share no task with documents."""
    if key not in a.curves or key not in b.curves:
        return None
    shared = {t: sorted(set(a.doc_ids[t]) & set(b.doc_ids[t])) for t in sorted(set(a.doc_ids) & set(b.doc_ids))}
    shared = {t: ids for t, ids in shared.items() if ids}
    if not shared:
        return None
    weights = draw_weights({t: len(ids) for t, ids in shared.items()}, resamples, seed)
    first = analyse_curve(a.curve(key, "task", shared), weights=weights, level=level)
    second = analyse_curve(b.curve(key, "task", shared), weights=weights, level=level)
    diff = paired_difference(second, first, level)
    damage = {
        m: matched_difference(
            b.curve(key, m, shared), a.curve(key, m, shared), weights, MATCHED_SPARSITIES, level, (b.label, a.label)
        )
        for m in PROXIES
    }
    return {
        "a": a.label,
        "b": b.label,
        "curve": "/".join(key),
        "tasks": list(shared),
        "n_docs": {t: len(ids) for t, ids in shared.items()},
        "difference": diff["value"],
        "ci_low": diff["ci_low"],
        "ci_high": diff["ci_high"],
        "p_b_greater": float(np.mean(second.samples > first.samples)),
        "verdict": verdict(b.label, a.label, diff, damage),
    }


def curves_figure(runs: Sequence[Run]) -> Figure:
    """Normalised performance vs achieved sparsity of every run, a panel per target (line style = rule)."""
    targets = sorted({t for r in runs for t, _ in r.curves})
    fig, axes = plt.subplots(1, len(targets), figsize=(1.0 + 4.6 * len(targets), 4.2), squeeze=False, sharey=True)
    styles = {"top_p": "-", "max_p": "--", "top_k": ":"}
    lows = [0.95]
    for ax, target in zip(axes[0], targets, strict=True):
        for i, run in enumerate(runs):
            color = RUN_COLORS[i % len(RUN_COLORS)]
            for (t, rule), curve in sorted(run.curves.items()):
                if t != target:
                    continue
                order = np.argsort(curve.sparsity, kind="stable")
                xs = [0.0, *(100 * curve.sparsity[order])]
                ys = [1.0, *curve.performance()[order]]
                lows += [y for y in ys if np.isfinite(y)]
                ax.plot(xs, ys, styles.get(rule, "-"), marker="o", ms=3, color=color, label=f"{run.label} {rule}")
                crit = run.summary["critical_sparsity"].get(f"{target}/{rule}")
                if crit and crit.get("value") is not None:
                    ax.axvline(100 * crit["value"], color=color, lw=0.8, ls=":")
        ax.axhline(THRESHOLD, color="gray", lw=0.8, ls="--")
        ax.set_title(target, fontsize=11)
        ax.set_xlabel("achieved sparsity (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("normalised performance")
    axes[0][0].set_ylim(max(0.0, min(lows) - 0.02), 1.02)
    fig.suptitle("Runs compared (dotted: critical sparsity of each run)", fontsize=11)
    fig.tight_layout()
    return fig


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def write_compare(
    run_dirs: Sequence[str | Path], out: str | Path, resamples: int = RESAMPLES, command: str = ""
) -> list[Path]:
    """compare.md and compare.png for several sweep folders; return the written paths."""
    if len(run_dirs) < 2:
        raise ValueError("--compare needs at least two run folders")
    for path in run_dirs:
        if not (Path(path) / RunStore.FILENAME).exists():
            raise ValueError(f"{path} is not a sweep folder: it has no {RunStore.FILENAME}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(p, resamples) for p in run_dirs]
    _labels(runs)
    figure = out / "compare.png"
    fig = curves_figure(runs)
    fig.savefig(figure, dpi=100)
    plt.close(fig)
    keys = sorted({k for r in runs for k in r.curves})
    command = command or "actsparse report --compare " + " ".join(str(p) for p in run_dirs)
    md = [
        "# Runs compared",
        "",
        f"Produced by `{command}`.",
        "",
        "| run | folder | tasks | documents per task |",
        "|---|---|---|---|",
    ]
    for r in runs:
        docs = ", ".join(f"{t}: {n}" for t, n in r.summary["n_docs"].items())
        md.append(f"| {r.label} | {r.path} | {', '.join(r.summary['tasks'])} | {docs} |")
    md += ["", "## Critical sparsity (average over each run's tasks, 95 % CI)", ""]
    md += ["| target/rule | " + " | ".join(r.label for r in runs) + " |", "|---|" + "---|" * len(runs)]
    for target, rule in keys:
        cells = []
        for r in runs:
            c = r.summary["critical_sparsity"].get(f"{target}/{rule}")
            cells.append(
                "–"
                if not c
                else ("≥ " if c["lower_bound"] else "")
                + f"{_pct(c['value'])} [{_pct(c['ci_low'])}, {_pct(c['ci_high'])}]"
            )
        md.append(f"| {target}/{rule} | " + " | ".join(cells) + " |")
    md += [
        "",
        "## Differences on shared tasks and documents (paired bootstrap)",
        "",
        "Critical sparsity of each run recomputed on the tasks and documents it shares with the first run; the "
        f"difference (run − {runs[0].label}) with a 95 % interval from {resamples} resamples that draw the same "
        "documents for both runs; P(>) is the fraction of resamples in which the run tolerates more.",
        "",
        "| target/rule | run | tasks (shared documents) | difference | 95 % CI | P(>) |",
        "|---|---|---|---|---|---|",
    ]
    differences = [
        (r, d) for key in keys for r in runs[1:] if (d := critical_difference(runs[0], r, key, resamples)) is not None
    ]
    for r, d in differences:
        shared = ", ".join(f"{t} ({n})" for t, n in d["n_docs"].items())
        md.append(
            f"| {d['curve']} | {r.label} | {shared} | {100 * d['difference']:+.1f} pts | "
            f"{100 * d['ci_low']:+.1f} – {100 * d['ci_high']:+.1f} | {d['p_b_greater']:.2f} |"
        )
    if not differences:
        md.append("| – | – | no shared tasks and documents | – | – | – |")
    else:
        md += ["", "Verdicts (critical sparsity, then damage at matched sparsity: mean KL and agreement):", ""]
        md += [f"- {d['verdict']}" for _, d in differences]
    md += ["", "## Curves", "", "![Runs compared](compare.png)", "", f"Command: `{command}`", ""]
    path = out / "compare.md"
    tmp = atomic_path(path)
    tmp.write_text("\n".join(md), encoding="utf-8")
    os.replace(tmp, path)
    return [path, figure]
