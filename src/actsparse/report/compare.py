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

from actsparse.analysis import LEVEL, RESAMPLES, THRESHOLD, Curve, critical_sparsity_batch, ratio, resample_weights
from actsparse.study.store import RunStore, atomic_path

RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f")


@dataclass
class Run:
    """One sweep folder: its label, summary, and per (target, rule) the curve with its documents."""

    label: str
    path: Path
    summary: dict[str, Any]
    curves: dict[tuple[str, str], Curve]
    doc_ids: dict[str, list[int]]  # task → the document ids behind each curve's arrays (sorted)


def load_run(path: str | Path, resamples: int = RESAMPLES) -> Run:
    """Summarise a sweep folder (summary.json is rewritten) and gather its paired per-document scores."""
    from actsparse.analysis import _curves, grouped_results, write_summary

    path = Path(path)
    with RunStore.open(path, create=False) as store:
        seed = int((store.get_meta("settings") or {}).get("seed") or 0)
        dense, sparse = grouped_results(store)
    summary = write_summary(path, resamples=resamples, seed=seed)
    if not summary["dense"]:
        raise ValueError(f"{path} has no dense baseline yet")
    tasks = summary["tasks"]
    curves = {key: curve for key, (curve, _) in _curves(summary["points"], dense, sparse, tasks).items()}
    doc_ids: dict[str, list[int]] = {}
    for t in tasks:  # as analysis._paired: the documents the dense run and every complete point share
        shared = {d.doc_id for d in dense[t].docs}
        for (target, rule, value), by_task in sparse.items():
            if (target, rule) in curves and value in curves[(target, rule)].params and t in by_task:
                shared &= {d.doc_id for d in by_task[t].docs}
        doc_ids[t] = sorted(shared)
    return Run(str(summary.get("model") or path.name), path, summary, curves, doc_ids)


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
    interval (the same document draw for both runs); None when they share no task with documents."""
    ca, cb = a.curves.get(key), b.curves.get(key)
    if ca is None or cb is None:
        return None
    tasks = sorted(set(ca.scores) & set(cb.scores))
    rng = np.random.default_rng(seed)
    boot: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    point: dict[str, list[np.ndarray]] = {"a": [], "b": []}
    used, n_docs = [], {}
    for t in tasks:
        shared = sorted(set(a.doc_ids[t]) & set(b.doc_ids[t]))
        if not shared:
            continue
        used.append(t)
        n_docs[t] = len(shared)
        w = resample_weights(len(shared), resamples, rng).astype(float)
        for side, run, curve in (("a", a, ca), ("b", b, cb)):
            if len(run.doc_ids[t]) != len(curve.dense[t]):
                raise ValueError(f"{run.path}: the points of {key[0]}/{key[1]} on {t} cover different documents")
            index = np.searchsorted(run.doc_ids[t], shared)
            dense, scores = curve.dense[t][index], curve.scores[t][:, index]
            boot[side].append(ratio(w @ scores.T, (w @ dense)[:, None]))  # [R, m]
            point[side].append(ratio(scores.mean(axis=1), dense.mean())[None, :])  # [1, m]
    if not used:
        return None

    def critical(curve: Curve, parts: list[np.ndarray]) -> np.ndarray:
        stack = np.stack(parts)  # [tasks, R, m]
        count = (~np.isnan(stack)).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            perf = np.where(count > 0, np.nansum(stack, axis=0) / np.maximum(count, 1), np.nan)
        return critical_sparsity_batch(curve.sparsity, perf, THRESHOLD)[0]

    value = float(critical(cb, point["b"])[0] - critical(ca, point["a"])[0])
    diffs = critical(cb, boot["b"]) - critical(ca, boot["a"])
    lo, hi = np.nanpercentile(diffs, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return {
        "a": a.label,
        "b": b.label,
        "curve": f"{key[0]}/{key[1]}",
        "tasks": used,
        "n_docs": n_docs,
        "difference": value,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p_b_greater": float(np.mean(diffs > 0)),
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
    differences = 0
    for key in keys:
        for r in runs[1:]:
            d = critical_difference(runs[0], r, key, resamples)
            if d is None:
                continue
            differences += 1
            shared = ", ".join(f"{t} ({n})" for t, n in d["n_docs"].items())
            md.append(
                f"| {d['curve']} | {r.label} | {shared} | {100 * d['difference']:+.1f} pts | "
                f"{100 * d['ci_low']:+.1f} – {100 * d['ci_high']:+.1f} | {d['p_b_greater']:.2f} |"
            )
    if not differences:
        md.append("| – | – | no shared tasks and documents | – | – | – |")
    md += ["", "## Curves", "", "![Runs compared](compare.png)", "", f"Command: `{command}`", ""]
    path = out / "compare.md"
    tmp = atomic_path(path)
    tmp.write_text("\n".join(md), encoding="utf-8")
    os.replace(tmp, path)
    return [path, figure]
