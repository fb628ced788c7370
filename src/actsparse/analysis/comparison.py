"""One footing for every method: the paper's critical sparsity with its interval, the paired difference
of each method's to top_p's, and where that cannot separate them, damage at matched sparsity (mean KL and
answer agreement with dense, interpolated at 25, 40 and 50 %) with the paired interval of each method's
difference to top_p, and a one-line verdict per method.

Curves come from one or more run folders of the same model, documents and tasks (a run folder per
allocation, say); each (target, rule) of each folder is one method. Every difference is paired: every
bootstrap resample draws the same documents for every curve, its dense baseline and each measure (one
draw per target).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actsparse.analysis.curves import (
    THRESHOLD,
    Criterion,
    Curve,
    CurveAnalysis,
    analyse_curve,
    build_curve,
    critical_record,
    paired_difference,
)
from actsparse.analysis.damage import MATCHED_SPARSITIES, NAMES, PROXIES, matched_difference, measure_at, verdict
from actsparse.analysis.statistics import LEVEL, RESAMPLES, draw_weights
from actsparse.analysis.summary import grouped_results, point_measure
from actsparse.evaluate.results import TaskResult
from actsparse.report.reading import censor_note, censored, interval_cell
from actsparse.study.store import RunStore

__all__ = ["MATCHED", "Method", "compare", "load_methods", "write_comparison"]

MATCHED: tuple[float, ...] = MATCHED_SPARSITIES
"""Sparsities at which KL and agreement are read off each curve (interpolated, never extrapolated)."""

BASELINE = "top_p"
CRITERIA = {measure: Criterion.of(measure) for measure in ("task", *PROXIES)}


@dataclass
class Method:
    """One (target, rule) of one run folder: its complete points, each with its result per task."""

    target: str
    rule: str
    label: str
    run: str
    sparsity: np.ndarray  # [m] achieved sparsity (pooled over the tasks' documents), increasing
    dense: dict[str, TaskResult]  # task → dense run
    runs: dict[str, list[TaskResult]]  # task → per point (in order of sparsity), its run
    extra: dict[str, Any] = field(default_factory=dict)

    def curve(self, measure: str, within: Mapping[str, list[int]]) -> Curve:
        """The method's curve on a measure (`task`, `kl`, `agreement`), over the documents `within`."""
        curve, ids = build_curve(
            self.target, self.rule, self.extra["values"], self.dense, self.runs, CRITERIA[measure], within
        )
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
        measured = {v: point_measure(dense, by_value[v])[0] for v in values}
        values.sort(key=lambda v: measured[v])
        pts = [by_value[v] for v in values]
        methods.append(
            Method(
                target=target,
                rule=rule,
                label=_label(rule, meta),
                run=run_dir.name,
                sparsity=np.array([measured[v] for v in values]),
                dense={t: dense[t] for t in tasks},
                runs={t: [p[t] for p in pts] for t in tasks},
                extra={
                    "values": values,
                    **({"predictor": _predictor_quality(run_dir, target)} if rule == "predictor" else {}),
                },
            )
        )
    return methods, settings


def _predictor_quality(run_dir: Path, target: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted((run_dir / "calibration").glob("predictor-*.json")):
        record = json.loads(path.read_text())
        if record.get("target") == target:
            out.append({k: record[k] for k in ("p", "rank", "recall", "precision", "flops_per_token")})
    return out


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


def compare(
    methods: Sequence[Method], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> dict[str, list[dict[str, Any]]]:
    """Per target, one row per method: critical sparsity [CI], its Δ to top_p [CI], KL and agreement at
    matched sparsity with the paired Δ to top_p's [CI], and a verdict. One draw of documents per target
    serves every method and every measure, so the differences are paired."""
    out: dict[str, list[dict[str, Any]]] = {}
    for target in sorted({m.target for m in methods}):
        group = [m for m in methods if m.target == target]
        ids = _shared_ids(group)
        weights = draw_weights({t: len(i) for t, i in ids.items()}, resamples, seed)
        curves = [{measure: m.curve(measure, ids) for measure in CRITERIA} for m in group]
        analyses = [analyse_curve(c["task"], level=level, weights=weights) for c in curves]
        base = next((i for i, m in enumerate(group) if m.rule == BASELINE), None)
        rows = []
        for i, (m, c, analysis) in enumerate(zip(group, curves, analyses, strict=True)):
            span = (float(np.nanmin(m.sparsity)), float(np.nanmax(m.sparsity)))
            row: dict[str, Any] = {
                "method": m.label,
                "rule": m.rule,
                "run": m.run,
                "points": len(m.sparsity),
                "max_sparsity": span[1],
                "critical_sparsity": _critical(analysis, span, m.extra["values"]),
                **{
                    p: {f"{s:g}": v for s, v in zip(MATCHED, measure_at(c[p], MATCHED)[0], strict=True)}
                    for p in PROXIES
                },
                **m.extra,
            }
            if base is not None and i != base:
                diff = paired_difference(analysis, analyses[base], level)
                names = (m.label, group[base].label)
                damage = {p: matched_difference(c[p], curves[base][p], weights, MATCHED, level, names) for p in PROXIES}
                row |= {
                    "diff_to_top_p": diff,
                    "damage_vs_top_p": damage,
                    "verdict": verdict(m.label, group[base].label, diff, damage),
                }
            rows.append(row)
        rows.sort(key=lambda r: (r["rule"] != BASELINE, -r["critical_sparsity"]["value"]))
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


def _damage_cell(row: dict[str, Any], proxy: str, s: float) -> str:
    """The proxy at sparsity s, and its paired Δ to top_p's [CI] where there is one."""
    value = row[proxy].get(f"{s:g}")
    if value is None:
        return "–"
    cell = f"{value:.4f}" if proxy == "kl" else _pct(value)
    for d in row.get("damage_vs_top_p", {}).get(proxy, []):
        if abs(d["sparsity"] - s) < 1e-9:
            scale, unit = (1.0, "") if proxy == "kl" else (100.0, " pts")
            cell += f" (Δ {scale * d['value']:+.3g}{unit} [{scale * d['ci_low']:+.3g}, {scale * d['ci_high']:+.3g}])"
    return cell


def markdown(rows_by_target: dict[str, list[dict[str, Any]]], model: str, command: str) -> str:
    lines = [f"# Methods compared on {model}", ""] + ([f"`{command}`", ""] if command else [])
    lines += [
        f"Critical sparsity: the highest achieved sparsity at which the mean over tasks of sparse / dense task "
        f"metric stays ≥ {THRESHOLD:.0%} (the paper's definition; 95 % paired-bootstrap interval over "
        "documents); '≥': the curve never crosses, a lower bound; 'censored': an end of the interval at the "
        "lowest or highest sparsity the curve reached. Δ: the method's critical sparsity minus top_p's, in "
        "points, the same resamples for both. Damage at matched sparsity: mean KL(dense ‖ sparse) and answer "
        f"agreement with dense interpolated at {', '.join(f'{s:.0%}' for s in MATCHED)} ('–': not reached), "
        "with the paired Δ to top_p [95 % CI]. These proxies are not critical sparsity: they say which method "
        "is damaged less at equal sparsity.",
        "",
    ]
    head = ["target", "method", "critical sparsity [95 % CI]", "Δ to top_p [95 % CI]"]
    head += [f"{NAMES[p]} @{s:.0%}" for p in PROXIES for s in MATCHED]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for target, rows in rows_by_target.items():
        for r in rows:
            cells = [target, r["method"], _critical_cell(r["critical_sparsity"])]
            cells.append(interval_cell(r.get("diff_to_top_p"), signed=True))
            cells += [_damage_cell(r, p, s) for p in PROXIES for s in MATCHED]
            lines.append("| " + " | ".join(cells) + " |")
    verdicts = [
        f"- {target}: {r['verdict']}" for target, rows in rows_by_target.items() for r in rows if "verdict" in r
    ]
    if verdicts:
        lines += ["", "Verdicts (each method against top_p):", "", *verdicts]
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
    """Normalised performance on the task metric (★: critical sparsity with its interval) and mean KL,
    against achieved sparsity: one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_k) = plt.subplots(1, 2, figsize=(12, 4.3))
    by_label = {r["method"]: r for r in rows}
    group = [m for m in methods if m.target == target]
    ids = _shared_ids(group)
    for i, m in enumerate(group):
        color = f"C{i % 10}"
        perf = m.curve("task", ids).performance()
        ax.plot(np.r_[0, m.sparsity] * 100, np.r_[1, perf], "o-", color=color, label=m.label)
        r = by_label.get(m.label)
        if r is not None:
            c = r["critical_sparsity"]
            low, high = (x if x is not None and np.isfinite(x) else c["value"] for x in (c["ci_low"], c["ci_high"]))
            ax.errorbar(
                100 * c["value"],
                THRESHOLD,
                xerr=[[100 * max(c["value"] - low, 0)], [100 * max(high - c["value"], 0)]],
                fmt=">" if c["lower_bound"] else "*", ms=12, color=color, capsize=3,
            )  # fmt: skip
        kl = m.curve("kl", ids).performance()
        ax_k.plot(np.r_[0, m.sparsity] * 100, np.r_[0, kl], "o-", color=color, label=m.label)
    ax.axhline(THRESHOLD, color="gray", ls="--", lw=1)
    ax.set_xlabel("achieved sparsity (%)")
    ax.set_ylabel("normalised performance (task metric)")
    ax.set_title("critical sparsity (★, 95 % CI; ▶: lower bound)", fontsize=10)
    for s in MATCHED:
        ax_k.axvline(100 * s, color="gray", ls=":", lw=1)
    ax_k.set_xlabel("achieved sparsity (%)")
    ax_k.set_ylabel("mean KL(dense ‖ sparse)")
    ax_k.set_yscale("symlog", linthresh=1e-3)
    ax_k.set_ylim(bottom=0)
    ax_k.set_title("damage at matched sparsity (dotted): mean KL", fontsize=10)
    ax.legend(fontsize=8)
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
