"""One footing for every method: critical sparsity with its interval, by the low-noise measure (the
headline, as in the sweep summary) and by accuracy, KL and answer agreement at matched sparsity, and the
paired-bootstrap interval of each method's difference to top_p.

Curves come from one or more run folders of the same model, documents and tasks (a run folder per
allocation, say); each (target, rule) of each folder is one method. The difference to top_p is
paired: every bootstrap resample draws the same documents for every curve, its dense baseline and
both measures (one draw per target).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actsparse.analysis import (
    LEVEL,
    RESAMPLES,
    THRESHOLD,
    Curve,
    CurveAnalysis,
    achieved_sparsity,
    agreement,
    analyse_curve,
    build_curve,
    critical_record,
    draw_weights,
    grouped_results,
    low_noise_metric,
    mean_kl,
    paired_difference,
)
from actsparse.evaluate.results import TaskResult
from actsparse.report.low_noise import interval_cell, measure_names
from actsparse.report.reading import censor_note, censored
from actsparse.study.store import RunStore

__all__ = ["MATCHED", "MEASURES", "Method", "compare", "interpolate", "load_methods", "write_comparison"]

MATCHED: tuple[float, ...] = (0.25, 0.40, 0.50)
"""Sparsities at which KL and agreement are read off each curve (interpolated, never extrapolated)."""

MEASURES: tuple[str, ...] = ("low_noise", "accuracy")
"""The measures of critical sparsity, the headline first (the sweep summary's `headline`)."""

BASELINE = "top_p"


@dataclass
class Method:
    """One (target, rule) of one run folder: its complete points, each with its result per task."""

    target: str
    rule: str
    label: str
    run: str
    sparsity: np.ndarray  # [m] achieved sparsity (mean over tasks)
    kl: np.ndarray  # [m] mean KL (NaN where missing)
    agreement: np.ndarray  # [m]
    dense: dict[str, TaskResult]  # task → dense run
    runs: dict[str, list[TaskResult]]  # task → per point (in order of sparsity), its run
    extra: dict[str, Any] = field(default_factory=dict)

    def curve(self, keys: Mapping[str, str | None], within: Mapping[str, list[int]]) -> Curve:
        """The method's curve on the measure `keys[task]` (None: the score), over the documents `within`."""
        curve, ids = build_curve(self.target, self.rule, self.extra["values"], self.dense, self.runs, keys, within)
        if ids != dict(within):
            raise ValueError(f"{self.label} lacks some of the documents it is compared on")
        return curve


def _label(rule: str, meta: dict[str, Any]) -> str:
    if rule == "threshold":
        return f"threshold ({meta.get('allocation') or 'uniform'})"
    if rule == "top_p_outlier":
        return f"top_p_outlier (m={float(meta.get('outlier_m') or 100):g})"
    if rule == "predictor":
        return f"predictor (rank {meta.get('predictor_rank') or 64})"
    return rule


def load_methods(run_dir: str | Path) -> tuple[list[Method], dict[str, Any]]:
    """The methods of a run folder and its settings (model, tasks, documents)."""
    run_dir = Path(run_dir)
    with RunStore.open(run_dir, create=False) as store:
        settings = store.get_meta("settings") or {}
        meta = {k: store.get_meta(k) for k in ("allocation", "outlier_m", "predictor_rank")}
        dense, by_point = grouped_results(store)
    sparse: dict[tuple[str, str], dict[float, dict[str, TaskResult]]] = {}
    for (target, rule, value), by_task in by_point.items():
        sparse.setdefault((target, rule), {})[value] = by_task
    tasks = [t for t in settings.get("tasks", sorted(dense)) if t in dense]
    methods = []
    for (target, rule), by_value in sorted(sparse.items()):
        values = [v for v, by_task in by_value.items() if all(t in by_task for t in tasks)]
        if not values or not tasks:
            continue
        values.sort(key=lambda v: np.mean([achieved_sparsity(by_value[v][t]) for t in tasks]))
        pts = [by_value[v] for v in values]
        kls = [[mean_kl(p[t].docs) for t in tasks] for p in pts]
        agrees = [[agreement(dense[t].docs, p[t].docs) for t in tasks] for p in pts]
        methods.append(
            Method(
                target=target,
                rule=rule,
                label=_label(rule, meta),
                run=run_dir.name,
                sparsity=np.array([np.mean([achieved_sparsity(p[t]) for t in tasks]) for p in pts]),
                kl=np.array([_nanmean(k) for k in kls]),
                agreement=np.array([_nanmean(a) for a in agrees]),
                dense={t: dense[t] for t in tasks},
                runs={t: [p[t] for p in pts] for t in tasks},
                extra={
                    "values": values,
                    **({"predictor": _predictor_quality(run_dir, target)} if rule == "predictor" else {}),
                },
            )
        )
    return methods, settings


def _nanmean(values: Sequence[float | None]) -> float:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept else math.nan


def _predictor_quality(run_dir: Path, target: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted((run_dir / "calibration").glob("predictor-*.json")):
        record = json.loads(path.read_text())
        if record.get("target") == target:
            out.append({k: record[k] for k in ("p", "rank", "recall", "precision", "flops_per_token")})
    return out


def interpolate(x: np.ndarray, y: np.ndarray, at: float, y0: float) -> float | None:
    """y at sparsity `at` on the curve through (0, y0) and the points (x, y); None outside it."""
    keep = np.isfinite(y)
    xs, ys = np.concatenate([[0.0], x[keep]]), np.concatenate([[y0], y[keep]])
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    if at > xs[-1] + 1e-12:
        return None
    return float(np.interp(at, xs, ys))


def _shared_ids(methods: Sequence[Method]) -> dict[str, list[int]]:
    """task → the documents that every method's dense run and every point have."""
    tasks = set(methods[0].dense)
    for m in methods[1:]:
        tasks &= set(m.dense)
    out = {}
    for task in sorted(tasks):
        shared = {d.doc_id for d in methods[0].dense[task].docs}
        for m in methods:
            for result in [m.dense[task], *m.runs[task]]:
                shared &= {d.doc_id for d in result.docs}
        out[task] = sorted(shared)
    return out


def _low_noise_keys(methods: Sequence[Method], tasks: Sequence[str]) -> dict[str, str | None]:
    """task → its low-noise measure (`analysis.low_noise_metric`) where every run of every method has
    the same one, else None (the task's score stands in, as for generation tasks)."""
    out = {}
    for t in tasks:
        keys = {low_noise_metric(r) for m in methods for r in [m.dense[t], *m.runs[t]]}
        out[t] = keys.pop() if len(keys) == 1 else None
    return out


def compare(
    methods: Sequence[Method], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> dict[str, list[dict[str, Any]]]:
    """Per target, one row per method: critical sparsity [CI] by each of `MEASURES`, Δ to top_p [CI] by
    each, matched-sparsity KL and agreement. One draw of documents per target serves every method and
    both measures, so the differences are paired."""
    out: dict[str, list[dict[str, Any]]] = {}
    for target in sorted({m.target for m in methods}):
        group = [m for m in methods if m.target == target]
        ids = _shared_ids(group)
        low_noise = _low_noise_keys(group, list(ids))
        keys = {"low_noise": low_noise, "accuracy": dict.fromkeys(ids)}
        weights = draw_weights({t: len(i) for t, i in ids.items()}, resamples, np.random.default_rng(seed))
        analyses = [
            {measure: analyse_curve(m.curve(keys[measure], ids), level=level, weights=weights) for measure in MEASURES}
            for m in group
        ]
        base = next((a for m, a in zip(group, analyses, strict=True) if m.rule == BASELINE), None)
        metrics = {t: low_noise[t] or group[0].dense[t].metric for t in ids}
        rows = []
        for m, analysis in zip(group, analyses, strict=True):
            row: dict[str, Any] = {
                "method": m.label,
                "rule": m.rule,
                "run": m.run,
                "points": len(m.sparsity),
                "max_sparsity": float(m.sparsity.max()),
                "critical_sparsity": {
                    measure: _critical(a, (float(m.sparsity.min()), float(m.sparsity.max())), m.extra["values"])
                    for measure, a in analysis.items()
                },
                "low_noise_metrics": metrics,
                "kl": {f"{s:g}": interpolate(m.sparsity, m.kl, s, 0.0) for s in MATCHED},
                "agreement": {f"{s:g}": interpolate(m.sparsity, m.agreement, s, 1.0) for s in MATCHED},
                **m.extra,
            }
            if base is not None and analysis is not base:
                row["diff_to_top_p"] = {
                    measure: paired_difference(analysis[measure], base[measure], level) for measure in MEASURES
                }
            rows.append(row)
        rows.sort(key=lambda r: (r["rule"] != BASELINE, -r["critical_sparsity"][MEASURES[0]]["value"]))
        out[target] = rows
    return out


def _critical(a: CurveAnalysis, span: tuple[float, float], params: list[float]) -> dict[str, Any]:
    """The summary's record of a critical sparsity, with which ends of its interval are censored by the
    range of sparsity the curve reached (`report.reading.censored`)."""
    record = critical_record(a.critical, a.ci, params)
    below, above = censored(record, span)
    return record | {"censored": {"below": below, "above": above}}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def _critical_cell(c: dict[str, Any]) -> str:
    note = censor_note((c["censored"]["below"], c["censored"]["above"]))
    return interval_cell(c) + (f" ({note})" if note else "")


def markdown(rows_by_target: dict[str, list[dict[str, Any]]], model: str, command: str) -> str:
    lines = [f"# Methods compared on {model}", ""] + ([f"`{command}`", ""] if command else [])
    lines += [
        f"Critical sparsity: highest achieved sparsity with normalised performance ≥ {THRESHOLD:.0%} "
        "(95 % paired-bootstrap interval over documents), by the low-noise measure (the headline: the gold "
        "answer's probability, or bits per byte as dense / sparse) and by accuracy, from the same resamples; "
        "'≥': the curve never crosses, a lower bound; 'censored': an end of the interval at the lowest or "
        "highest sparsity the curve reached. Δ: the method's critical sparsity minus top_p's, in points, the "
        f"same resamples for both. KL and agreement with the dense answer interpolated at "
        f"{', '.join(f'{s:.0%}' for s in MATCHED)} sparsity ('–': the curve does not reach it).",
        "",
    ]
    for target, rows in rows_by_target.items():
        lines.append(f"Low-noise measure on {target}: {measure_names(rows[0]['low_noise_metrics'])}.")
    head = [
        "target",
        "method",
        "critical sparsity, low-noise [95 % CI]",
        "Δ to top_p, low-noise [95 % CI]",
        "critical sparsity, accuracy [95 % CI]",
        "Δ to top_p, accuracy [95 % CI]",
    ]
    head += [f"KL @{s:.0%}" for s in MATCHED] + [f"agree @{s:.0%}" for s in MATCHED]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for target, rows in rows_by_target.items():
        for r in rows:
            cells = [target, r["method"]]
            for measure in MEASURES:
                diff = r.get("diff_to_top_p", {}).get(measure)
                cells += [_critical_cell(r["critical_sparsity"][measure]), interval_cell(diff, signed=True)]
            cells += [_num(r["kl"][f"{s:g}"]) for s in MATCHED] + [_pct(r["agreement"][f"{s:g}"]) for s in MATCHED]
            lines.append("| " + " | ".join(cells) + " |")
    for rows in rows_by_target.values():
        for r in rows:
            for q in r.get("predictor", []):
                f = q["flops_per_token"]
                lines.append(
                    f"\npredictor p = {q['p']:g} (rank {q['rank']}): held-out recall {q['recall']:.1%}, precision "
                    f"{q['precision']:.1%}; {f['predictor']:,} FLOPs per token, "
                    f"{f['predictor'] / f['ffn']:.1%} of the FFN's {f['ffn']:,}"
                )
    lines.append("")
    return "\n".join(lines)


def plot(methods: Sequence[Method], target: str, rows: list[dict[str, Any]], model: str) -> Any:
    """Normalised performance by the low-noise measure and by accuracy (★: critical sparsity with its
    interval), and KL, against achieved sparsity: one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    ax_k = axes[-1]
    by_label = {r["method"]: r for r in rows}
    group = [m for m in methods if m.target == target]
    ids = _shared_ids(group)
    keys = {"low_noise": _low_noise_keys(group, list(ids)), "accuracy": dict.fromkeys(ids)}
    for i, m in enumerate(group):
        color = f"C{i % 10}"
        for ax, measure in zip(axes[:2], MEASURES, strict=True):
            perf = m.curve(keys[measure], ids).performance()
            ax.plot(np.r_[0, m.sparsity] * 100, np.r_[1, perf], "o-", color=color, label=m.label)
            r = by_label.get(m.label)
            if r is not None:
                c = r["critical_sparsity"][measure]
                low, high = (
                    x if x is not None and math.isfinite(x) else c["value"] for x in (c["ci_low"], c["ci_high"])
                )
                ax.errorbar(
                    100 * c["value"],
                    THRESHOLD,
                    xerr=[[100 * max(c["value"] - low, 0)], [100 * max(high - c["value"], 0)]],
                    fmt=">" if c["lower_bound"] else "*", ms=12, color=color, capsize=3,
                )  # fmt: skip
        ax_k.plot(np.r_[0, m.sparsity] * 100, np.r_[0, m.kl], "o-", color=color, label=m.label)
    for ax, measure in zip(axes[:2], MEASURES, strict=True):
        ax.axhline(THRESHOLD, color="gray", ls="--", lw=1)
        ax.set_xlabel("achieved sparsity (%)")
        ax.set_ylabel(f"normalised performance, {measure.replace('_', '-')}")
        ax.set_title(f"{measure.replace('_', '-')} (★: critical sparsity, 95 % CI; ▶: lower bound)", fontsize=10)
    for s in MATCHED:
        ax_k.axvline(100 * s, color="gray", ls=":", lw=1)
    ax_k.set_xlabel("achieved sparsity (%)")
    ax_k.set_ylabel("mean KL(dense ‖ sparse)")
    ax_k.set_yscale("symlog", linthresh=1e-3)
    ax_k.set_ylim(bottom=0)
    ax_k.set_title("KL at matched sparsity (dotted)", fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{model}: methods on {target}", fontsize=12)
    fig.tight_layout()
    return fig


def write_comparison(
    run_dirs: Sequence[str | Path], out: str | Path, resamples: int = RESAMPLES, command: str = ""
) -> list[Path]:
    """Compare every method of `run_dirs`; write compare.md, compare.json and compare_TARGET.png into `out`."""
    methods: list[Method] = []
    models = set()
    seen_docs: dict[str, Any] = {}
    for run_dir in run_dirs:
        found, settings = load_methods(run_dir)
        models.add(settings.get("model"))
        for key in ("limit", "seed"):
            if key in seen_docs and seen_docs[key] != settings.get(key):
                raise ValueError(
                    f"{run_dir} used {key} = {settings.get(key)!r}, another run {seen_docs[key]!r}: not comparable"
                )
            seen_docs[key] = settings.get(key)
        methods += found
    if len(models) > 1:
        raise ValueError(f"the runs are of different models: {', '.join(map(str, models))}")
    if not methods:
        raise ValueError("no complete sparse points in the given run folders")
    labels = [(m.target, m.label) for m in methods]
    for m in methods:  # the same method in two folders: name them by folder
        if labels.count((m.target, m.label)) > 1:
            m.label = f"{m.label} [{m.run}]"
    seed = int(seen_docs.get("seed") or 0)
    rows = compare(methods, resamples, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(next(iter(models)))
    paths = [out / "compare.md", out / "compare.json"]
    paths[0].write_text(markdown(rows, model, command), encoding="utf-8")
    paths[1].write_text(
        json.dumps({"model": model, "runs": [str(r) for r in run_dirs], "targets": rows}, indent=2, default=float)
    )
    import matplotlib.pyplot as plt

    for target, target_rows in rows.items():
        fig = plot(methods, target, target_rows, model)
        path = out / f"compare_{target}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
