"""`actsparse outliers`: per-layer table and plot of massive activations on calibration text."""

from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.cli.common import add_model_argument, comma_list, make_console
from actsparse.models.placement import add_placement_arguments


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("outliers", help="find massive activations per layer on calibration text (table and plot)")
    add_model_argument(p)
    add_placement_arguments(p)
    p.add_argument("--m", type=float, default=100.0, help="an entry is massive above m × its token's median |v|")
    p.add_argument("--vectors", default="input,intermediate", help="comma-separated vectors to measure")
    p.add_argument("--data", type=Path, help="a plain-text file (default: built-in public-domain text)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens to read")
    p.add_argument(
        "--out", type=Path, help="folder for outliers.json/.md/.png (a sweep's run folder: its report marks them)"
    )
    return p


def run(args: argparse.Namespace) -> int:
    from actsparse.methods.outlier_topp import check_m
    from actsparse.models.placement import from_args
    from actsparse.sparsity.spec import VECTORS

    check_m(args.m)
    vectors = comma_list(args.vectors)
    unknown = [v for v in vectors if v not in VECTORS]
    if unknown or not vectors:
        raise ValueError(f"unknown vector {unknown[0] if unknown else ''!r}; choose from {', '.join(VECTORS)}")
    if args.tokens < 1:
        raise ValueError("--tokens must be positive")
    out = args.out or Path("runs") / "outliers" / Path(args.model).name
    where = from_args(args)  # a bad --device or --dtype, or cuda without a GPU: exit 2 before any model work
    from actsparse.speed.calibrate import calibration_batches, calibration_text
    from actsparse.study.outliers import find_outliers, table

    text = calibration_text(args.data)
    console = make_console()
    with console.status(f"loading {args.model}"):
        from actsparse.models.loading import load_model

        model, tokenizer = load_model(args.model, where.dtype, where.device)
    with console.status("measuring"):
        records = find_outliers(model, calibration_batches(tokenizer, text, args.tokens), args.m, vectors)
    path = write_outputs(out, records, args.model, args.m)
    header, rows = table(records)
    massive = {v: sorted({r.layer for r in records if r.vector == v and r.massive}) for v in vectors}
    from rich.table import Table

    shown = Table(*header)
    for r in rows:
        shown.add_row(*r)
    console.print(shown)
    for v, ls in massive.items():
        console.print(f"massive activations in {v}: layers {', '.join(map(str, ls)) or 'none'}", highlight=False)
    console.print(f"wrote {path}, {out / 'outliers.md'}, {out / 'outliers.png'}", highlight=False)
    return 0


def write_outputs(out: Path, records: list, model: str, m: float) -> Path:
    """outliers.json, outliers.md (the table) and outliers.png into `out`; returns the JSON's path."""
    from actsparse.study.outliers import plot, save_outliers, table

    path = save_outliers(out, records, model, m)
    header, rows = table(records)
    md = [f"# Massive activations of {model} (m = {m:g}, {records[0].tokens} calibration tokens)", ""]
    md += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    vectors = sorted({r.vector for r in records})
    massive = {v: sorted({r.layer for r in records if r.vector == v and r.massive}) for v in vectors}
    md += [
        "",
        *(f"- massive activations in `{v}`: layers {', '.join(map(str, ls)) or 'none'}" for v, ls in massive.items()),
    ]
    (out / "outliers.md").write_text("\n".join(md) + "\n")
    fig = plot(records, model, m)
    fig.savefig(out / "outliers.png", dpi=110)
    return path
