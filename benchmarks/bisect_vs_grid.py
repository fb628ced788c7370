"""`--search bisect` against the full paper grid on the embedded model: critical sparsity and evaluations.

    python benchmarks/bisect_vs_grid.py [--targets input,intermediate] [--tasks arc_easy] [--limit 50]
                                        [--precision 0.02] [--refine] [--out runs/bisect_vs_grid]

Runs (or resumes) two sweeps with the same settings, one over the paper's 26 values of p and one by
bisection, in OUT/grid and OUT/bisect, then prints each (target, rule)'s critical sparsity from both,
their difference against the precision, and how many values each evaluated. On 2 CPU cores the grid
of two targets on 50 arc_easy documents takes about 30 minutes, the bisection about 6.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from actsparse.study.search import DEFAULT_PRECISION
from actsparse.study.sweep import PAPER_VALUES, SweepConfig, run_sweep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", default="input,intermediate")
    parser.add_argument("--tasks", default="arc_easy")
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--precision", type=float, default=DEFAULT_PRECISION, help="in achieved sparsity")
    parser.add_argument("--refine", action="store_true", help="bisect on the value between grid neighbours too")
    parser.add_argument("--out", type=Path, default=Path("runs/bisect_vs_grid"))
    args = parser.parse_args(argv)
    common = dict(
        model=args.model,
        targets=args.targets.split(","),
        tasks=args.tasks.split(","),
        limit=args.limit,
        values=PAPER_VALUES,
        resamples=200,
    )
    seconds, summaries = {}, {}
    for search in ("grid", "bisect"):
        start = time.perf_counter()
        name = "bisect-refine" if search == "bisect" and args.refine else search
        config = SweepConfig(out=args.out / name, search=search, precision=args.precision, refine=args.refine, **common)
        summaries[search] = run_sweep(config, show_progress=False)
        seconds[search] = time.perf_counter() - start
    grid, bisect = summaries["grid"], summaries["bisect"]
    evaluated = bisect["search"]["evaluated"]
    print(f"{'curve':<22}{'grid':>8}{'bisect':>8}{'|diff|':>8}  within {args.precision:g}  evaluations")
    for label, g in grid["critical_sparsity"].items():
        b = bisect["critical_sparsity"][label]
        diff = abs(b["value"] - g["value"])
        n_grid = sum(1 for p in grid["points"] if f"{p['target']}/{p['rule']}" == label)
        within = "yes" if diff <= args.precision else "no"
        n = len(evaluated[label])
        values = ", ".join(f"{v:g}" for v, _, _ in evaluated[label])
        print(f"{label:<22}{g['value']:>8.3f}{b['value']:>8.3f}{diff:>8.3f}  {within:<10}  {n} of {n_grid}: {values}")
    print(f"time of this run (resumed points are free): grid {seconds['grid']:.0f} s, bisect {seconds['bisect']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
