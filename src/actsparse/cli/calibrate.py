"""`actsparse calibrate`: per-layer thresholds reaching a sparsity on a calibration text."""

from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.cli.common import add_model_argument, check_output_file, make_console, read_text_file
from actsparse.models.placement import add_placement_arguments
from actsparse.sparsity.spec import TARGETS


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("calibrate", help="calibrate per-layer thresholds (TEAL-style) for the threshold rule")
    add_model_argument(p)
    p.add_argument("--target", choices=TARGETS, default="all_inputs", help="the vector(s) to calibrate")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of entries to zero, in [0, 1]")
    p.add_argument("--data", type=Path, help="a plain-text file (default: built-in public-domain text)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens to read")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    add_placement_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from actsparse.sparsity.spec import check_target

    check_target(args.target)
    if not 0.0 <= args.sparsity <= 1.0:
        raise ValueError(f"--sparsity must lie in [0, 1], got {args.sparsity}")
    if args.tokens < 1 or args.seq_len < 1:
        raise ValueError("--tokens and --seq-len must be positive")
    check_output_file(args.out)  # before loading and calibrating, not after
    from actsparse.models.loading import load_model
    from actsparse.models.placement import from_args
    from actsparse.speed.calibrate import calibrate, calibration_batches, calibration_text, save_thresholds

    where = from_args(args)
    text = calibration_text() if args.data is None else read_text_file(args.data, "--data")
    console = make_console()
    with console.status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model, where.dtype, where.device)
    batches = calibration_batches(tokenizer, text, args.tokens, args.seq_len)
    with console.status("calibrating"):
        thresholds = calibrate(model, batches, args.target, args.sparsity)
    save_thresholds(args.out, thresholds, args.model, args.target, args.sparsity)
    console.print(
        f"{len(thresholds)} layers of {args.model} ({where.dtype} on {where.device}) calibrated to "
        f"{args.sparsity:.0%} {args.target} → {args.out}"
    )
    return 0
