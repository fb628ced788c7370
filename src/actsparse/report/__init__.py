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

from actsparse.report.reading import censor_note, censored, describe_missing, interval_cell, missing, reached, settled
from actsparse.study.store import atomic_path

Table = tuple[list[str], list[list[str]]]

HEADLINE = "Critical sparsity"
COMPARISONS = "Damage at matched sparsity"
DENSE = "Dense scores"
PER_TASK = "Critical sparsity per task [95 % CI]"
POWER = "Power: interval half-width and documents needed for ±2 points"
MISSING = "Missing points"
POINTS = "Every point"

TITLES = {
    "critical_sparsity.png": "Normalised performance against achieved sparsity (the paper's figure)",
    "performance.png": "Normalised performance per task",
    "critical_per_task.png": "Critical sparsity per task",
    "top_p_vs_max_p.png": "Top-p against max-p",
}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _crit_cell(summary: dict[str, Any], label: str, c: dict[str, Any] | None, task: str | None = None) -> str:
    """'≥ 40.1 % [32.9 %, 51.2 %] (censored above)' of a critical sparsity, or why there is none yet."""
    count = sum(len(ts) for _, ts in missing(summary).get(label, []) if task is None or task in ts)
    if not settled(summary, label, task):  # missing points could still move it: no number from part of a curve
        return f"incomplete: {count} missing (see Missing points)" if task is None else "incomplete"
    if not c or c.get("value") is None:
        return "–"
    note = censor_note(censored(c, reached(summary, label, task)))
    beyond = f" ({count} missing beyond the crossing)" if count and task is None else ""
    return interval_cell(c) + (f" ({note})" if note else "") + beyond


def _grid(c: dict[str, Any] | None) -> str:
    if not c or c.get("value") is None:
        return "–"
    if "grid_param" in c and c["grid_param"] is None:  # the crossing comes before the first point
        return "dense"
    return _pct(c["grid_value"]) + ("" if c.get("grid_param") is None else f" (at {c['grid_param']:g})")


def _damage(rows: list[dict[str, Any]], scale: float) -> str:
    cells = [
        f"{100 * r['sparsity']:.0f} %: {scale * r['value']:+.3g} "
        f"[{scale * r['ci_low']:+.3g}, {scale * r['ci_high']:+.3g}]"
        for r in rows
    ]
    return "; ".join(cells) or "not reached by both"


def tables(summary: dict[str, Any]) -> dict[str, Table]:
    """The report's tables by title, the headline first (see `SECTIONS` for where each one goes)."""
    tasks = summary["tasks"]
    lacking = missing(summary)
    labels = sorted(set(summary["critical_sparsity"]) | set(lacking))
    headline = []
    for label in labels:
        c = summary["critical_sparsity"].get(label)
        docs = "–" if not c else str(c.get("documents", "–"))
        crosses = "–" if not c or c.get("value") is None else ("no: a lower bound" if c["lower_bound"] else "yes")
        if not settled(summary, label):
            headline.append([label, _crit_cell(summary, label, c), "–", "–", "–"])
            continue
        headline.append([label, _crit_cell(summary, label, c), _grid(c), docs, crosses])
    out: dict[str, Table] = {
        HEADLINE: (
            ["target/rule", "critical sparsity [95 % CI]", "last grid point ≥ 99 %", "documents per task", "crosses"],
            headline,
        )
    }
    comparisons = summary.get("comparisons", [])
    if comparisons:
        rows = []
        for c in comparisons:
            d = c["critical"]
            rows.append(
                [
                    f"{c['first']} − {c['second']}",
                    interval_cell(d, signed=True),
                    _damage(c["damage"].get("kl", []), 1.0),
                    _damage(c["damage"].get("agreement", []), 100.0),
                ]
            )
        out[COMPARISONS] = (
            [
                "difference",
                "critical sparsity (pts)",
                "mean KL at matched sparsity",
                "agreement (pts) at matched sparsity",
            ],
            rows,
        )
    extra = summary.get("criterion")
    if extra:
        title = f"{extra['name'][0].upper()}{extra['name'][1:]} (a proxy, not the paper's critical sparsity)"
        out[title] = (
            ["target/rule", f"{extra['name']} [95 % CI]", "last grid point"],
            [[label, interval_cell(c), _grid(c)] for label, c in sorted(extra["crossing"].items())],
        )
    out[DENSE] = (
        ["task", "split used", "metric", "documents", "dense score"],
        [
            [t, summary["splits"].get(t, "?"), summary["metrics"].get(t, "?"), str(summary["n_docs"].get(t, "?")),
             _pct(summary["dense"][t])]
            for t in tasks
        ],
    )  # fmt: skip
    per_task = summary.get("critical_sparsity_per_task", {})
    if per_task and len(tasks) > 1:
        out[PER_TASK] = (
            ["target/rule", *tasks],
            [
                [label, *(_crit_cell(summary, label, per_task[label].get(t), t) for t in tasks)]
                for label in sorted(per_task)
            ],
        )
    power = summary.get("power", {}).get("curves", {})
    if power:
        out[POWER] = (
            ["target/rule", "documents per task", "half-width (pts)", "documents needed for ±2 pts"],
            [
                [label, str(p.get("documents")),
                 "–" if p.get("half_width") is None else f"±{100 * p['half_width']:.1f}",
                 "beyond 10⁶" if p.get("documents_needed") is None else str(p["documents_needed"])]
                for label, p in sorted(power.items())
            ],
        )  # fmt: skip
    if lacking:
        out[MISSING] = (
            ["target/rule", "missing (value: tasks)"],
            [[label, describe_missing(points, tasks)] for label, points in sorted(lacking.items())],
        )
    out[POINTS] = (
        ["target", "rule", "value", "sparsity", "normalised", *tasks, "mean KL", "agreement", "tasks done"],
        [
            [p["target"], p["rule"], f"{p['value']:g}", _pct(p["sparsity"]), _num(p["normalized"]),
             *[_pct(p["scores"].get(t)) for t in tasks], _num(p["kl"], 4), _pct(p["agreement"]),
             f"{len(p['scores'])}/{len(tasks)}"]
            for p in summary["points"]
        ],
    )  # fmt: skip
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


def _lead(summary: dict[str, Any]) -> str:
    """The one paragraph above the headline: what was run and what the headline number is."""
    settings = summary.get("settings", {})
    limit = settings.get("limit")
    metrics = ", ".join(f"{t}: {summary['metrics'].get(t, '?')}" for t in summary["tasks"])
    return (
        f"{summary.get('model')} on {', '.join(summary['tasks'])} "
        f"({'every document' if limit is None else f'{limit} documents'} per task, "
        f"{'/'.join(sorted(set(summary.get('splits', {}).values()))) or '?'} split). Critical sparsity is the "
        "paper's: the highest achieved sparsity at which the mean over tasks of sparse / dense task metric "
        f"({metrics}) stays ≥ {summary.get('threshold', 0.99):.0%}, with a 95 % paired-bootstrap interval over "
        "documents."
    )


def _method(summary: dict[str, Any]) -> list[str]:
    """How every number was computed: the report's last section."""
    boot = summary.get("bootstrap", {})
    settings = summary.get("settings", {})
    text = [
        f"Documents: {'every document' if settings.get('limit') is None else 'a seeded sample'} of each task, "
        f"seed {settings.get('seed')}; the same documents for the dense model and every point. Splits: "
        + ", ".join(f"{t}: {s}" for t, s in summary.get("splits", {}).items())
        + ".",
        "Normalised performance of a point = mean over tasks of the task metric sparse / dense on the same "
        "documents (bits-per-byte tasks: dense bpb / sparse bpb). Achieved sparsity = entries zeroed / entries "
        "seen over the real tokens of every task's documents (pooled). Critical sparsity = the first crossing "
        "of 99 % along increasing sparsity, linearly interpolated between the two points around it; the last "
        "grid point before it is the paper's reading; a curve that never crosses gives a lower bound (≥).",
        f"Intervals: {boot.get('level', 0.95):.0%} paired bootstrap over documents, {boot.get('resamples')} "
        "resamples, the same resample for the dense model, every point and each point's achieved sparsity. An "
        "interval marked censored reaches the lowest or highest sparsity its curve measured: the true end may "
        "lie beyond it (extend the grid there). Bands in the figures: each point's interval of the same measure.",
        "Proxies of damage, reported under their own names and never as critical sparsity: the mean "
        "KL(dense ‖ sparse) over scored tokens and the share of answers equal to the dense model's. They vary less "
        "from document to document but measure something else; 'Damage at matched sparsity' reads them off two "
        "curves at the "
        f"same sparsity ({', '.join(f'{100 * s:.0f} %' for s in summary.get('matched_sparsities', []))}, "
        "interpolated, never extrapolated) with the paired interval of the difference.",
        *_search(summary.get("search", {})),
    ]
    return text


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
figcaption{font-size:.85em;color:#555}figure.headline img{max-height:460px;width:auto}
details{margin:.8em 0}summary{font-size:1.15em;font-weight:600;cursor:pointer}
"""


def _section(md: list[str], body: list[str], title: str, parts: list[tuple[str, str]], collapsed: bool) -> None:
    """A section of both documents: `parts` are (markdown, html) pairs; collapsed in the HTML when asked."""
    if not parts:
        return
    md += [f"## {title}", "", *(m + "\n" for m, _ in parts)]
    inner = "".join(h for _, h in parts)
    if collapsed:
        body.append(f"<details><summary>{html.escape(title)}</summary>{inner}</details>")
    else:
        body.append(f"<h2>{html.escape(title)}</h2>{inner}")


def _table_part(table_map: dict[str, Table], name: str, heading: bool = False) -> list[tuple[str, str]]:
    if name not in table_map:
        return []
    md = (f"### {name}\n\n" if heading else "") + _md_table(table_map[name])
    return [(md, (f"<h3>{html.escape(name)}</h3>" if heading else "") + _html_table(table_map[name]))]


def _image_part(path: Path, css: str = "") -> tuple[str, str]:
    title = _title(path.name)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f"![{title}]({path.name})",
        f'<figure{f" class={css!r}" if css else ""}><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(title)}</figcaption></figure>",
    )


def _text_part(paragraphs: list[str]) -> list[tuple[str, str]]:
    return [(p, f"<p>{html.escape(p)}</p>") for p in paragraphs]


def render(summary: dict[str, Any], images: Sequence[Path]) -> tuple[str, str]:
    """(markdown, self-contained html) of a summary and its PNG figures, laid out as a researcher reads
    the paper: the headline table and figure, the comparisons, the heatmaps, then (collapsed in the HTML)
    per-task results, power, every point, method and provenance."""
    title = f"actsparse sweep report: {summary.get('model')}"
    table_map = tables(summary)
    by_name = {p.name: p for p in images}
    lead = [_lead(summary), *_partial(summary)]
    md = [f"# {title}", "", *(p + "\n" for p in lead)]
    body = [f"<h1>{html.escape(title)}</h1>", *(f"<p>{html.escape(p)}</p>" for p in lead)]
    headline = _table_part(table_map, HEADLINE)
    if "critical_sparsity.png" in by_name:
        headline.append(_image_part(by_name["critical_sparsity.png"], "headline"))
    _section(md, body, HEADLINE, headline, collapsed=False)
    verdicts = [c["verdict"] for c in summary.get("comparisons", [])]
    comparison_parts = []
    if verdicts:
        comparison_parts.append(
            (
                "\n".join(f"- {v}" for v in verdicts),
                "<ul>" + "".join(f"<li>{html.escape(v)}</li>" for v in verdicts) + "</ul>",
            )
        )
    comparison_parts += _table_part(table_map, COMPARISONS)
    comparison_parts += [pair for name in table_map if name.endswith("not the paper's critical sparsity)")
                         for pair in _table_part(table_map, name, heading=True)]  # fmt: skip
    _section(md, body, "Comparisons", comparison_parts, collapsed=False)
    heatmaps = [
        p for name, p in by_name.items() if name.startswith("heatmap_") and not name.startswith("heatmap_tasks_")
    ]
    _section(md, body, "Where the sparsity lies, per layer", [_image_part(p) for p in heatmaps], collapsed=False)
    per_task = _table_part(table_map, DENSE, True) + _table_part(table_map, PER_TASK, True)
    per_task += [_image_part(by_name[n]) for n in ("performance.png", "critical_per_task.png") if n in by_name]
    per_task += [_image_part(p) for name, p in by_name.items() if name.startswith("heatmap_tasks_")]
    _section(md, body, "Per task", per_task, collapsed=True)
    _section(md, body, POWER, _table_part(table_map, POWER), collapsed=True)
    _section(md, body, MISSING, _table_part(table_map, MISSING), collapsed=True)
    shown = {"critical_sparsity.png", "performance.png", "critical_per_task.png"} | {p.name for p in heatmaps}
    others = [p for name, p in by_name.items() if name not in shown and not name.startswith("heatmap_tasks_")]
    _section(md, body, "More figures", [_image_part(p) for p in others], collapsed=True)
    _section(md, body, POINTS, _table_part(table_map, POINTS), collapsed=True)
    _section(md, body, "Method", _text_part(_method(summary)), collapsed=True)
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
        f"<details><summary>Provenance</summary><ul>{items}</ul></details>",
    ]


def write_report(run_dir: str | Path, resamples: int | None = None, criterion: Any = None) -> list[Path]:
    """Summarise `run_dir` (summary.json) and write report.md, report.html and the PNGs; return their paths.
    A `--dtypes` folder gets every dtype's report and the comparison (`report.precision`)."""
    from actsparse.analysis import RESAMPLES, point_bands, write_summary
    from actsparse.report.plots import save_figures
    from actsparse.report.reading import planned
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
    summary = write_summary(
        run_dir, resamples=resamples or RESAMPLES, seed=seed, **({"criterion": criterion} if criterion else {})
    )
    if not summary["dense"]:
        raise ValueError(f"{run_dir} has no dense baseline yet: run `actsparse sweep --out {run_dir}` first")
    with RunStore.open(run_dir, create=False) as store:  # what the report adds to the summary's numbers
        summary["planned"] = planned(store) if summary["search"].get("method") != "bisect" else []
        summary["bands"] = point_bands(store, summary["tasks"], resamples or RESAMPLES, seed)
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
