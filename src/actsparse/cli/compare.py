"""`actsparse compare RUN_DIR...`: every method of the given run folders on one footing."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from actsparse.cli.common import make_console


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "compare",
        help="compare methods across run folders: critical sparsity and its Δ to top_p, damage (KL, agreement) at "
        "matched sparsity with its Δ to top_p, a verdict per method",
    )
    p.add_argument(
        "run_dirs", type=Path, nargs="+", help="--out folders of `actsparse sweep` (same model and documents)"
    )
    p.add_argument("--out", type=Path, help="folder for compare.md/.json/.png (default: the first run folder)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the intervals")
    return p


def run(args: argparse.Namespace) -> int:
    from actsparse.analysis.comparison import write_comparison

    if args.resamples < 10:
        raise ValueError(f"--resamples must be at least 10, got {args.resamples}")
    for run_dir in args.run_dirs:
        if not (run_dir / "results.sqlite").is_file():
            raise ValueError(f"{run_dir} is not a sweep folder (no results.sqlite)")
    command = "actsparse " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["compare"] else ""
    paths = write_comparison(args.run_dirs, args.out or args.run_dirs[0], args.resamples, command)
    console = make_console()
    console.print(paths[0].read_text(), highlight=False)
    console.print(f"wrote {', '.join(str(p) for p in paths)}", highlight=False)
    return 0
