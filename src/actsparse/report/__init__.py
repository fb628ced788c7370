"""`write_report(run_dir)`: report.md, a self-contained report.html (plots embedded) and PNG plots.

Tables and figures come from the summary (`actsparse.analysis.summarize`), recomputed from the
run's results.sqlite so that a report of an unfinished sweep shows what is stored so far.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from actsparse.report import low_noise
from actsparse.report.reading import censor_note, censored, describe_missing, missing, reached, settled
from actsparse.study.store import atomic_path

Table = tuple[list[str], list[list[str]]]

TITLES = {
    "performance.png": "Normalised performance vs achieved sparsity",
    "critical_per_task.png": "Critical sparsity per task",
    "top_p_vs_max_p.png": "Top-p against max-p",
}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def tables(summary: dict[str, Any]) -> dict[str, Table]:
    """The report's tables by title: dense scores, critical sparsity (overall, per task), every point."""
    tasks = summary["tasks"]
    dense_rows = [
        [
            t,
            summary["splits"].get(t, "?"),
            summary["metrics"].get(t, "?"),
            str(summary["n_docs"].get(t, "?")),
            _pct(summary["dense"][t]),
        ]
        for t in tasks
    ]
    out: dict[str, Table] = {"Dense scores": (["task", "split used", "metric", "documents", "score"], dense_rows)}

    lacking = missing(summary)

    def crit_row(label: str, c: dict[str, Any] | None) -> list[str]:
        count = sum(len(ts) for _, ts in lacking.get(label, []))
        if c is None or not settled(summary, label):  # a number from part of the curve would mislead
            return [label, f"incomplete: {count} missing (see Missing points)", "–", "–", ""]
        value = ("≥ " if c["lower_bound"] else "") + _pct(c["value"])
        if count:
            value += f" ({count} missing beyond the crossing)"
        if "grid_param" in c and c["grid_param"] is None:  # the crossing comes before the first point
            grid = "dense"
        else:
            grid = _pct(c["grid_value"]) + ("" if c.get("grid_param") is None else f" (at {c['grid_param']:g})")
        note = censor_note(censored(c, reached(summary, label)))
        ci = f"{_pct(c['ci_low'])} – {_pct(c['ci_high'])}" + (f" ({note})" if note else "")
        return [label, value, ci, grid, "yes" if c["lower_bound"] else ""]

    head = ["target/rule", "critical sparsity", "95 % CI (paired bootstrap)", "last grid point ≥ 99 %", "lower bound"]
    labels = sorted(set(summary["critical_sparsity"]) | set(lacking))
    out["Critical sparsity (average over tasks)"] = (
        head,
        [crit_row(label, summary["critical_sparsity"].get(label)) for label in labels],
    )
    per_task = summary.get("critical_sparsity_per_task", {})
    if per_task and len(tasks) > 1:
        rows = []
        for label in sorted(per_task):
            cells = []
            for t in tasks:
                c = per_task[label].get(t)
                if not settled(summary, label, t):  # missing points could still move it
                    cells.append("incomplete")
                    continue
                note = "" if not c else censor_note(censored(c, reached(summary, label, t)))
                cells.append(
                    "–"
                    if not c
                    else ("≥ " if c["lower_bound"] else "")
                    + f"{_pct(c['value'])} [{_pct(c['ci_low'])}, {_pct(c['ci_high'])}]"
                    + (f" {note}" if note else "")
                )
            rows.append([label, *cells])
        out["Critical sparsity per task (95 % CI)"] = (["target/rule", *tasks], rows)
    if lacking:
        out["Missing points"] = (
            ["target/rule", "missing (value: tasks)"],
            [[label, describe_missing(points, tasks)] for label, points in sorted(lacking.items())],
        )
    point_rows = [
        [
            p["target"],
            p["rule"],
            f"{p['value']:g}",
            _pct(p["sparsity"]),
            _num(p["normalized"]),
            _num(p.get("normalized_low_noise")),
            *[_pct(p["scores"].get(t)) for t in tasks],
            _num(p["kl"], 4),
            _pct(p["agreement"]),
            f"{len(p['scores'])}/{len(tasks)}",
        ]
        for p in summary["points"]
    ]
    out |= low_noise.tables(summary)
    out["Every point"] = (
        [
            "target",
            "rule",
            "value",
            "sparsity",
            "normalised",
            "normalised (low-noise)",
            *tasks,
            "mean KL",
            "agreement",
            "tasks done",
        ],
        point_rows,
    )
    return out


def _md_table(table: Table) -> str:
    head, rows = table
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    head, rows = table
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _title(name: str) -> str:
    if name.startswith("heatmap_tasks_"):
        return f"Per-layer sparsity per task: {name[len('heatmap_tasks_') : -4]}"
    if name.startswith("heatmap_"):
        return f"Per-layer sparsity: {name[len('heatmap_') : -4]}"
    return TITLES.get(name, name)


def _intro(summary: dict[str, Any]) -> list[str]:
    settings = summary.get("settings", {})
    limit = settings.get("limit")
    boot = summary.get("bootstrap", {})
    splits = ", ".join(f"{t}: {s}" for t, s in summary.get("splits", {}).items())
    return [
        f"Model: {summary.get('model')}. Tasks: {', '.join(summary['tasks'])} "
        f"({'every document' if limit is None else f'a seeded sample of {limit} documents'} per task, "
        f"seed {settings.get('seed')}; splits used: {splits}).",
        "Normalised performance = mean over tasks of sparse score / dense score on the same documents. "
        f"Critical sparsity = highest achieved sparsity at which it stays ≥ {summary.get('threshold', 0.99):.0%} "
        "(linear interpolation at the first crossing; the last grid point before it is the paper's reading). "
        f"Intervals: {boot.get('level', 0.95):.0%} paired bootstrap over documents, {boot.get('resamples')} "
        "resamples, the same resample for dense and sparse. Mean KL(dense ‖ sparse) over scored tokens and "
        "the agreement of chosen answers with the dense model are paired, low-noise signals of damage.",
        "Curves show each point's 95 % paired-bootstrap band of score / dense score. An interval marked "
        "censored reaches the lowest or highest sparsity its curve measured: the true end may lie beyond it "
        "(extend the grid there).",
        *low_noise.intro(summary),
        *_search(summary.get("search", {})),
        *_partial(summary),
    ]


def _partial(summary: dict[str, Any]) -> list[str]:
    """A paragraph naming a partial run's missing points (nothing for a complete run)."""
    lacking = missing(summary)
    if not lacking:
        return []
    count = sum(len(ts) for points in lacking.values() for _, ts in points)
    return [
        f"This run is incomplete: {count} (point, task) results are missing (see Missing points). A curve "
        "gets a critical sparsity only where its missing points lie beyond its crossing and cannot change "
        "it; rerun the same `actsparse sweep` command to complete the run."
    ]


def _search(search: dict[str, Any]) -> list[str]:
    """A paragraph naming the values a bisection evaluated (nothing for a grid)."""
    if search.get("method") != "bisect":
        return []
    curves = "; ".join(
        f"{label}: {len(points)} values ({', '.join(f'{v:g}' for v, _, _ in points)})"
        for label, points in search.get("evaluated", {}).items()
    )
    return [
        f"Search: bisection (`--search bisect`{' --refine' if search.get('refine') else ''}), "
        f"precision {search.get('precision', 0):g} in achieved sparsity, "
        f"instead of the {len(search.get('grid', []))}-value grid; the points evaluated, in order: {curves}."
    ]


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.4em 0}figure{margin:0}
"""


def render(summary: dict[str, Any], images: Sequence[Path]) -> tuple[str, str]:
    """(markdown, self-contained html) of a summary and its PNG figures."""
    title = f"actsparse sweep report: {summary.get('model')}"
    table_map = tables(summary)
    md = [f"# {title}", "", *_intro(summary), ""]
    body = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{html.escape(p)}</p>" for p in _intro(summary))]
    order = [
        "Dense scores",
        low_noise.HEADLINE,
        low_noise.DIFFERENCES,
        "Critical sparsity (average over tasks)",
        "Critical sparsity per task (95 % CI)",
        low_noise.POWER,
        "Missing points",
    ]
    for name in order:
        if name in table_map:
            md += [f"## {name}", "", _md_table(table_map[name]), ""]
            body += [f"<h2>{html.escape(name)}</h2>", _html_table(table_map[name])]
    for path in images:
        md += [f"## {_title(path.name)}", "", f"![{_title(path.name)}]({path.name})", ""]
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body += [
            f"<h2>{html.escape(_title(path.name))}</h2>",
            f'<figure><img alt="{html.escape(_title(path.name))}" src="data:image/png;base64,{data}"></figure>',
        ]
    md += ["## Every point", "", _md_table(table_map["Every point"]), ""]
    body += ["<h2>Every point</h2>", _html_table(table_map["Every point"])]
    md, body = _with_provenance(summary, md, body)
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    return "\n".join(md), page


def _with_provenance(summary: dict[str, Any], md: list[str], body: list[str]) -> tuple[list[str], list[str]]:
    """The report's provenance section: version, model source and quantisation, dtype, device, command."""
    from actsparse.study.provenance import lines

    found = lines(summary.get("provenance"))
    if not found:
        return md, body
    items = "".join(f"<li>{html.escape(line)}</li>" for line in found)
    return [*md, "## Provenance", "", *(f"- {line}" for line in found), ""], [
        *body,
        f"<h2>Provenance</h2><ul>{items}</ul>",
    ]


def write_report(run_dir: str | Path, resamples: int | None = None) -> list[Path]:
    """Summarise `run_dir` (summary.json) and write report.md, report.html and the PNGs; return their paths.
    A `--dtypes` folder gets every dtype's report and the comparison (`report.precision`)."""
    from actsparse.analysis import RESAMPLES, write_summary
    from actsparse.report.plots import save_figures
    from actsparse.report.reading import bands, planned
    from actsparse.study.precision import is_precision_folder
    from actsparse.study.store import RunStore

    run_dir = Path(run_dir)
    if is_precision_folder(run_dir):
        from actsparse.report.precision import write_precision_report
        from actsparse.study.precision import dtypes_of

        folders = [run_dir / dtype for dtype in dtypes_of(run_dir) if (run_dir / dtype / "results.sqlite").exists()]
        written = [path for folder in folders for path in write_report(folder, resamples=resamples)]
        return written + write_precision_report(run_dir, CSS, resamples)
    with RunStore.open(run_dir, create=False) as store:
        settings = store.get_meta("settings") or {}
    seed = int(settings.get("seed") or 0)
    summary = write_summary(run_dir, resamples=resamples or RESAMPLES, seed=seed)
    if not summary["dense"]:
        raise ValueError(f"{run_dir} has no dense baseline yet: run `actsparse sweep --out {run_dir}` first")
    with RunStore.open(run_dir, create=False) as store:  # what the report adds to the summary's numbers
        summary["planned"] = planned(store) if summary["search"].get("method") != "bisect" else []
        summary["bands"] = bands(store, summary["tasks"], resamples or RESAMPLES, seed)
    from actsparse.study.outliers import load_outliers

    summary["outliers"] = load_outliers(run_dir)  # heatmaps mark the layers with massive activations
    images = save_figures(summary, run_dir)
    from actsparse.report.diffusion import save_step_figures

    images += save_step_figures(run_dir)  # diffusion models: per-step sparsity and keep-mask stability
    from actsparse.report.structure import save_sweep_task_heatmaps

    images += save_sweep_task_heatmaps(run_dir)  # per-layer sparsity of each task alone, not only pooled
    md, page = render(summary, images)
    written = []
    for name, text in (("report.md", md), ("report.html", page)):
        path = run_dir / name
        tmp = atomic_path(path)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        written.append(path)
    return [*written, *images]


__all__ = ["render", "tables", "write_report"]
