"""`actsparse transfer --from TASKS --to TASKS`: fix each target's point on some tasks, test it on others."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from actsparse.cli.common import add_model_argument, add_sample_arguments, comma_list, make_console, parse_limit
from actsparse.models.placement import add_placement_arguments


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "transfer",
        help="fix each target's operating point on some tasks and measure its retention on others",
        description="Sweep top_p on the --from tasks (OUT/source, resumable), fix each target at the p where their "
        "normalised performance crosses 99 % (or, --rule threshold, at per-layer thresholds calibrated on their "
        "prompts to that sparsity), evaluate that point on every task, and write OUT/transfer.json, "
        "OUT/transfer.md and plots: retention per task with a paired-bootstrap interval, per-task heatmaps and "
        "densities of per-token sparsity. Bits-per-byte tasks (gsm8k_bpb, humaneval_bpb, mbpp_bpb, "
        "minerva_math_bpb) retain dense_bpb / sparse_bpb.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_argument(p)
    add_placement_arguments(p)
    p.add_argument("--from", dest="sources", default="arc_easy,piqa", help="source tasks, comma-separated")
    p.add_argument("--to", dest="destinations", default="gsm8k_bpb,humaneval_bpb,mbpp_bpb", help="destination tasks")
    p.add_argument("--targets", default="input,intermediate", help="comma-separated targets")
    p.add_argument("--values", default="0.99,0.98,0.97,0.95,0.9,0.85", help="top_p grid of the source sweep")
    p.add_argument("--rule", default="top_p", choices=("top_p", "threshold"), help="how the point is fixed")
    p.add_argument("--limit", type=parse_limit, default=60, help="documents per source task, or 'all'")
    p.add_argument("--to-limit", type=parse_limit, default=30, help="documents per destination task, or 'all'")
    add_sample_arguments(p)
    p.add_argument("--out", type=Path, default=Path("runs/transfer"), help="run folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--report-only", action="store_true", help="evaluate nothing: write the report from the points stored so far"
    )
    return p


def run(args: argparse.Namespace) -> int:
    from actsparse.report.transfer import write_transfer_report
    from actsparse.study.sweep import parse_values
    from actsparse.study.transfer import TransferConfig, run_transfer

    console = make_console(stderr=True)
    config = TransferConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        sources=comma_list(args.sources),
        destinations=comma_list(args.destinations),
        targets=comma_list(args.targets),
        values=parse_values(args.values),
        rule=args.rule,
        limit=args.limit,
        dest_limit=args.to_limit,
        seed=args.seed,
        batch_size=args.batch_size,
        resamples=args.resamples,
        out=args.out,
        report_only=args.report_only,
        command="actsparse " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["transfer"] else "actsparse transfer",
    )
    config.validate()
    result = run_transfer(config, show_progress=not args.no_progress, log=lambda m: console.print(m, highlight=False))
    paths = write_transfer_report(args.out)
    for target, rows in result["retention"].items():
        console.print(f"{target} at {result['specs'][target]}:", highlight=False)
        for task, r in rows.items():
            console.print(
                f"  {task:<18} {r['role']:<11} retention {r['value']:.3f} "
                f"(95% CI {r['ci_low']:.3f}–{r['ci_high']:.3f}, {r['measure']}), sparsity {r['sparsity']:.1%}",
                highlight=False,
            )
    console.print(f"wrote {', '.join(p.name for p in paths)} in {args.out}", highlight=False)
    return 0
