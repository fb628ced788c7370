"""The report of a `--dtypes` sweep: each dtype's dense scores and critical sparsity side by side with
their intervals, the paired differences between dtypes with theirs, one curve per dtype, and each
dtype's provenance; every dtype's own full report is written in its sub-folder beside it."""

from __future__ import annotations

import base64
import html
import math
import os
from pathlib import Path
from typing import Any

from actsparse.study.store import atomic_path

Table = tuple[list[str], list[list[str]]]


def _pct(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.1f} %" if sign else f"{100 * x:.1f} %"


def _crit(c: dict[str, Any] | None) -> str:
    if not c:
        return "–"
    bound = "≥ " if c.get("lower_bound") else ""
    return f"{bound}{_pct(c['value'])} [{_pct(c['ci_low'])}, {_pct(c['ci_high'])}]"


def tables(summary: dict[str, Any]) -> dict[str, Table]:
    """The comparison's tables by title."""
    dtypes, tasks = summary["dtypes"], summary["tasks"]
    pairs = sorted({p for by in summary["dense_differences"].values() for p in by})
    dense_rows = []
    for t in tasks:
        row = [t, summary["splits"].get(t, "?"), str(summary["n_docs"].get(dtypes[0], {}).get(t, "?"))]
        row += [_pct(summary["dense"].get(d, {}).get(t)) for d in dtypes]
        for pair in pairs:
            d = summary["dense_differences"].get(t, {}).get(pair)
            row.append(
                "–" if not d else f"{_pct(d['value'], True)} [{_pct(d['ci_low'], True)}, {_pct(d['ci_high'], True)}]"
            )
            row.append("–" if not d or d.get("agreement") is None else _pct(d["agreement"]))
        dense_rows.append(row)
    dense_head = ["task", "split used", "documents", *dtypes]
    for pair in pairs:
        dense_head += [f"{pair} (95 % paired CI)", f"same answer ({pair})"]
    critical_rows = [
        [label, *(_crit(by.get(d)) for d in dtypes)] for label, by in sorted(summary["critical_sparsity"].items())
    ]
    diff_rows = []
    for label, by_pair in sorted(summary["differences"].items()):
        for pair, d in by_pair.items():
            note = "a curve never crosses: bound" if d.get("lower_bound") else ""
            diff_rows.append(
                [label, pair, _pct(d["value"], True), f"{_pct(d['ci_low'], True)} to {_pct(d['ci_high'], True)}", note,
                 d.get("verdict", "")]
            )  # fmt: skip
    return {
        "Dense scores by dtype": (dense_head, dense_rows),
        "Critical sparsity by dtype (95 % CI, paired bootstrap)": (["target/rule", *dtypes], critical_rows),
        "Paired difference of critical sparsity between dtypes": (
            [
                "target/rule",
                "dtypes",
                "difference",
                "95 % CI (one resample of documents for both dtypes)",
                "",
                "verdict",
            ],
            diff_rows,
        ),
    }


def performance_by_dtype(summary: dict[str, Any], path: Path) -> Path | None:
    """Normalised performance vs achieved sparsity: a panel per target/rule, a line per dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({f"{p['target']}/{p['rule']}" for pts in summary["points"].values() for p in pts})
    if not labels:
        return None
    cols = min(3, len(labels))
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False, sharey=True)
    styles = {"float32": ("-", "o"), "bfloat16": ("--", "s"), "float16": (":", "^")}
    for ax, label in zip(axes.flat, labels, strict=False):
        for dtype in summary["dtypes"]:
            pts = [
                p
                for p in summary["points"].get(dtype, [])
                if f"{p['target']}/{p['rule']}" == label and p.get("complete") and p["sparsity"] is not None
            ]
            pts.sort(key=lambda p: p["sparsity"])
            xs = [0.0] + [100 * p["sparsity"] for p in pts]
            ys = [1.0] + [p["normalized"] if p["normalized"] is not None else math.nan for p in pts]
            line, marker = styles.get(dtype, ("-", "o"))
            ax.plot(xs, ys, line, marker=marker, ms=3.5, label=dtype)
            c = summary["critical_sparsity"].get(label, {}).get(dtype)
            if c and c.get("value") is not None:
                ax.axvline(100 * c["value"], ls=line, lw=0.8, color=ax.lines[-1].get_color(), alpha=0.6)
        ax.axhline(summary.get("threshold", 0.99), color="gray", lw=0.8)
        ax.set_title(label)
        ax.set_xlabel("achieved sparsity (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.flat[len(labels) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("normalised performance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _md_table(table: Table) -> str:
    head, rows = table
    return "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        + ["| " + " | ".join(r) + " |" for r in rows]
    )


def _html_table(table: Table) -> str:
    head, rows = table
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render(summary: dict[str, Any], image: Path | None, css: str) -> tuple[str, str]:
    """(markdown, self-contained html, styled by `css`) of a comparison."""
    from actsparse.study.provenance import lines

    title = f"actsparse precision report: {summary.get('model')}"
    settings = summary.get("settings", {})
    limit = settings.get("limit")
    boot = summary.get("bootstrap", {})
    intro = (
        f"Dtypes: {', '.join(summary['dtypes'])}, each a full sweep in its own folder on the same documents "
        f"({'every document' if limit is None else f'a seeded sample of {limit} documents'} per task, seed "
        f"{settings.get('seed')}). Critical sparsity as in each dtype's own report; differences are later minus "
        f"earlier dtype, with a {boot.get('level', 0.95):.0%} paired bootstrap ({boot.get('resamples')} resamples) "
        "that draws the same documents for both dtypes and their dense baselines."
    )
    table_map = tables(summary)
    md = [f"# {title}", "", intro, ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for name, table in table_map.items():
        md += [f"## {name}", "", _md_table(table), ""]
        body += [f"<h2>{html.escape(name)}</h2>", _html_table(table)]
    if image is not None:
        name = "Normalised performance vs achieved sparsity, by dtype"
        md += [f"## {name}", "", f"![{name}]({image.name})", ""]
        data = base64.b64encode(image.read_bytes()).decode("ascii")
        body += [
            f"<h2>{html.escape(name)}</h2>",
            f'<figure><img alt="{name}" src="data:image/png;base64,{data}"></figure>',
        ]
    md += ["## Provenance", ""]
    body += ["<h2>Provenance</h2>"]
    for dtype, record in summary.get("provenance", {}).items():
        md += [f"- **{dtype}** ([full report]({dtype}/report.md))", *(f"  - {line}" for line in lines(record))]
        items = "".join(f"<li>{html.escape(line)}</li>" for line in lines(record))
        body += [f'<h3>{html.escape(dtype)} (<a href="{dtype}/report.html">full report</a>)</h3><ul>{items}</ul>']
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{css}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    return "\n".join(md) + "\n", page


def write_precision_report(run_dir: str | Path, css: str, resamples: int | None = None) -> list[Path]:
    """The comparison of a `--dtypes` folder (summary.json, report.md, report.html, its plot); each dtype's
    own report is `actsparse.report.write_report`'s, which calls this."""
    from actsparse.analysis import RESAMPLES
    from actsparse.study.precision import write_comparison

    run_dir = Path(run_dir)
    written: list[Path] = []
    summary = write_comparison(run_dir, resamples=resamples or RESAMPLES, seed=int(summary_seed(run_dir) or 0))
    image = performance_by_dtype(summary, run_dir / "performance_by_dtype.png")
    md, page = render(summary, image, css)
    for name, text in (("report.md", md), ("report.html", page)):
        path = run_dir / name
        tmp = atomic_path(path)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        written.insert(0, path)
    return written + ([image] if image else [])


def summary_seed(run_dir: Path) -> int | None:
    """The seed the sweeps of a `--dtypes` folder were run with (the bootstrap's too)."""
    from actsparse.study.precision import dtypes_of
    from actsparse.study.store import RunStore

    for dtype in dtypes_of(run_dir):
        if (run_dir / dtype / "results.sqlite").exists():
            with RunStore.open(run_dir / dtype, create=False) as store:
                return (store.get_meta("settings") or {}).get("seed")
    return None


__all__ = ["performance_by_dtype", "render", "tables", "write_precision_report"]
