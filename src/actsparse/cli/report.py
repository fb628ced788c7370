"""`actsparse report RUN_DIR`: summary.json, report.md, a self-contained report.html and PNG plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.cli.common import at_least, make_console, parse_criterion


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="analyse a sweep folder and write report.md, report.html and plots")
    p.add_argument("run_dir", type=Path, nargs="?", help="the --out folder of `actsparse sweep`")
    p.add_argument("--compare", type=Path, nargs="+", metavar="RUN", help="compare several sweep folders instead")
    p.add_argument("--out", type=Path, default=Path("runs/compare"), help="--compare: folder for compare.md")
    p.add_argument(
        "--resamples", type=at_least(10, "--resamples"), default=1000, help="bootstrap resamples for the intervals"
    )
    p.add_argument(
        "--criterion",
        default="task",
        help="also report the crossing of another criterion, named after it: agreement:0.99 or kl:0.05 (the "
        "headline stays the paper's critical sparsity)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from actsparse.report import write_report

    if args.resamples < 10:
        raise ValueError(f"--resamples must be at least 10, got {args.resamples}")
    parse_criterion(args.criterion)  # a bad criterion: exit 2 before any work
    if args.compare:
        from actsparse.report.compare import write_compare

        if args.run_dir is not None:
            raise ValueError("give either RUN_DIR or --compare RUN_A RUN_B ..., not both")
        paths = write_compare(args.compare, args.out, resamples=args.resamples)
        make_console().print(f"wrote {', '.join(p.name for p in paths)} in {args.out}", highlight=False)
        return 0
    if args.run_dir is None:
        raise ValueError("report needs a run folder (or --compare RUN_A RUN_B ...)")
    paths = write_report(args.run_dir, resamples=args.resamples, criterion=parse_criterion(args.criterion))
    console = make_console()
    console.print(f"wrote {len(paths)} files in {args.run_dir}:", highlight=False)
    for path in paths:
        console.print(
            f"  {path.relative_to(args.run_dir) if path.is_relative_to(args.run_dir) else path}", highlight=False
        )
    return 0
