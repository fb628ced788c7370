"""One footing for every method: critical sparsity with its interval, KL and answer agreement at
matched sparsity, and the paired-bootstrap interval of each method's difference to top_p.

Curves come from one or more run folders of the same model, documents and tasks (a run folder per
allocation, say); each (target, rule) of each folder is one method. The difference to top_p is
paired: every bootstrap resample draws the same documents for both curves and both dense baselines.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actsparse.analysis import (
    LEVEL,
    RESAMPLES,
    THRESHOLD,
    achieved_sparsity,
    agreement,
    critical_sparsity_batch,
    mean_kl,
    ratio,
    resample_weights,
)
from actsparse.store import RunStore

__all__ = ["MATCHED", "Method", "compare", "interpolate", "load_methods", "write_comparison"]

MATCHED: tuple[float, ...] = (0.25, 0.40, 0.50)
"""Sparsities at which KL and agreement are read off each curve (interpolated, never extrapolated)."""

BASELINE = "top_p"


@dataclass
class Method:
    """One (target, rule) of one run folder: its complete points, with per-document scores by task."""

    target: str
    rule: str
    label: str
    run: str
    sparsity: np.ndarray  # [m] achieved sparsity (mean over tasks)
    kl: np.ndarray  # [m] mean KL (NaN where missing)
    agreement: np.ndarray  # [m]
    dense: dict[str, dict[int, float]]  # task → doc → dense score
    scores: dict[str, list[dict[int, float]]]  # task → per point, doc → score
    extra: dict[str, Any] = field(default_factory=dict)


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
        dense: dict[str, Any] = {}
        sparse: dict[tuple[str, str], dict[float, dict[str, Any]]] = {}
        for key, result in store.items():
            if key.is_dense:
                dense[key.task] = result
            else:
                sparse.setdefault((key.target, key.rule), {}).setdefault(key.value, {})[key.task] = result
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
                dense={t: {d.doc_id: d.score for d in dense[t].docs} for t in tasks},
                scores={t: [{d.doc_id: d.score for d in p[t].docs} for p in pts] for t in tasks},
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


def _boot_critical(method: Method, ids: dict[str, list[int]], weights: dict[str, np.ndarray]) -> np.ndarray:
    """[R] critical sparsity of `method` under the given per-task resample weights over documents `ids`."""
    per_task = []
    for task, doc_ids in ids.items():
        dense = np.array([method.dense[task][i] for i in doc_ids])
        scores = np.array([[point[i] for i in doc_ids] for point in method.scores[task]])  # [m, n]
        w = weights[task]
        per_task.append(ratio(w @ scores.T, (w @ dense)[:, None]))
    return critical_sparsity_batch(method.sparsity, _task_mean(per_task))[0]


def _shared_ids(methods: Sequence[Method]) -> dict[str, list[int]]:
    tasks = set(methods[0].dense)
    for m in methods[1:]:
        tasks &= set(m.dense)
    out = {}
    for task in sorted(tasks):
        shared = set(methods[0].dense[task])
        for m in methods:
            shared &= set(m.dense[task])
            for point in m.scores[task]:
                shared &= set(point)
        out[task] = sorted(shared)
    return out


def compare(
    methods: Sequence[Method], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> dict[str, list[dict[str, Any]]]:
    """Per target, one row per method: critical sparsity [CI], matched-sparsity KL and agreement, Δ to top_p [CI]."""
    out: dict[str, list[dict[str, Any]]] = {}
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    for target in sorted({m.target for m in methods}):
        group = [m for m in methods if m.target == target]
        baseline = next((m for m in group if m.rule == BASELINE), None)
        ids = _shared_ids(group)
        rng = np.random.default_rng(seed)
        weights = {t: resample_weights(len(i), resamples, rng).astype(float) for t, i in ids.items()}
        base_boot = None if baseline is None else _boot_critical(baseline, ids, weights)
        base_value = None if baseline is None else _critical(baseline)[0]
        rows = []
        for m in group:
            value, lower = _critical(m)
            boot = _boot_critical(m, ids, weights)
            row: dict[str, Any] = {
                "method": m.label,
                "rule": m.rule,
                "run": m.run,
                "points": len(m.sparsity),
                "max_sparsity": float(m.sparsity.max()),
                "critical": value,
                "lower_bound": lower,
                "ci": [float(x) for x in np.nanpercentile(boot, q)],
                "kl": {f"{s:g}": interpolate(m.sparsity, m.kl, s, 0.0) for s in MATCHED},
                "agreement": {f"{s:g}": interpolate(m.sparsity, m.agreement, s, 1.0) for s in MATCHED},
                **m.extra,
            }
            if base_boot is not None and base_value is not None and m is not baseline:
                diff = boot - base_boot
                row["diff_to_top_p"] = value - base_value
                row["diff_ci"] = [float(x) for x in np.nanpercentile(diff, q)]
            rows.append(row)
        rows.sort(key=lambda r: (r["rule"] != BASELINE, -r["critical"]))
        out[target] = rows
    return out


def _critical(m: Method) -> tuple[float, bool]:
    """(critical sparsity, lower-bound flag) of a method on all its documents."""
    ids = {t: list(m.dense[t]) for t in m.dense}
    perf = _point_perf(m, ids, {t: np.ones((1, len(i))) for t, i in ids.items()})
    value, _, _, lower = critical_sparsity_batch(m.sparsity, perf)
    return float(value[0]), bool(lower[0])


def _point_perf(m: Method, ids: dict[str, list[int]], weights: dict[str, np.ndarray]) -> np.ndarray:
    per_task = []
    for task, doc_ids in ids.items():
        dense = np.array([m.dense[task][i] for i in doc_ids])
        scores = np.array([[point.get(i, math.nan) for i in doc_ids] for point in m.scores[task]])
        per_task.append(ratio(weights[task] @ scores.T, (weights[task] @ dense)[:, None]))
    return _task_mean(per_task)


def _task_mean(per_task: list[np.ndarray]) -> np.ndarray:
    """Mean over tasks, leaving out NaN (a resample whose dense score is 0); NaN where every task is."""
    stack = np.stack(per_task)
    count = (~np.isnan(stack)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.nansum(stack, axis=0) / np.maximum(count, 1), np.nan)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def markdown(rows_by_target: dict[str, list[dict[str, Any]]], model: str, command: str) -> str:
    lines = [f"# Methods compared on {model}", "", f"`{command}`", ""]
    lines += [
        f"Critical sparsity: highest achieved sparsity with normalised performance ≥ {THRESHOLD:.0%} "
        f"(95 % paired-bootstrap interval over documents); KL and agreement with the dense answer "
        f"interpolated at {', '.join(f'{s:.0%}' for s in MATCHED)} sparsity ('–': the curve does not reach it); "
        "Δ: the method's critical sparsity minus top_p's, the same resamples for both.",
        "",
    ]
    for target, rows in rows_by_target.items():
        lines += [f"## {target}", ""]
        head = ["method", "critical sparsity [95 % CI]", "Δ to top_p [95 % CI]"]
        head += [f"KL @{s:.0%}" for s in MATCHED] + [f"agree @{s:.0%}" for s in MATCHED]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            bound = "≥ " if r["lower_bound"] else ""
            crit = f"{bound}{_pct(r['critical'])} [{_pct(r['ci'][0])}, {_pct(r['ci'][1])}]"
            diff = (
                "–"
                if "diff_ci" not in r
                else f"{100 * r['diff_to_top_p']:+.1f} [{100 * r['diff_ci'][0]:+.1f}, {100 * r['diff_ci'][1]:+.1f}]"
            )
            cells = [r["method"], crit, diff]
            cells += [_num(r["kl"][f"{s:g}"]) for s in MATCHED] + [_pct(r["agreement"][f"{s:g}"]) for s in MATCHED]
            lines.append("| " + " | ".join(cells) + " |")
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_p, ax_k) = plt.subplots(1, 2, figsize=(11, 4.3))
    by_label = {r["method"]: r for r in rows}
    for m in [m for m in methods if m.target == target]:
        ids = {t: list(m.dense[t]) for t in m.dense}
        perf = _point_perf(m, ids, {t: np.ones((1, len(i))) for t, i in ids.items()})[0]
        line = ax_p.plot(np.r_[0, m.sparsity] * 100, np.r_[1, perf], "o-", label=m.label)[0]
        r = by_label.get(m.label)
        if r is not None:
            ax_p.errorbar(
                100 * r["critical"],
                THRESHOLD,
                xerr=[[100 * (r["critical"] - r["ci"][0])], [100 * (r["ci"][1] - r["critical"])]],
                fmt="*", ms=12, color=line.get_color(), capsize=3,
            )  # fmt: skip
        ax_k.plot(np.r_[0, m.sparsity] * 100, np.r_[0, m.kl], "o-", color=line.get_color(), label=m.label)
    ax_p.axhline(THRESHOLD, color="gray", ls="--", lw=1)
    ax_p.set_xlabel("achieved sparsity (%)")
    ax_p.set_ylabel("normalised performance")
    ax_p.set_title("performance (★: critical sparsity, 95 % CI)", fontsize=10)
    for s in MATCHED:
        ax_k.axvline(100 * s, color="gray", ls=":", lw=1)
    ax_k.set_xlabel("achieved sparsity (%)")
    ax_k.set_ylabel("mean KL(dense ‖ sparse)")
    ax_k.set_yscale("symlog", linthresh=1e-3)
    ax_k.set_ylim(bottom=0)
    ax_k.set_title("KL at matched sparsity (dotted)", fontsize=10)
    ax_p.legend(fontsize=8)
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
