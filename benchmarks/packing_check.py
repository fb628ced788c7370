"""Packed-tree scoring against the cached path on a real model: per-document equality and time.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/packing_check.py [--model gemma3-270m]
                                             [--tasks arc_easy,hellaswag] [--limit 40]

Scores the same seeded documents with `evaluate_task(packing=True)` and `packing=False`, back to back,
and prints for each task both times and the fraction of documents whose metrics are equal.
"""

from __future__ import annotations

import argparse
import sys
import time

from actsparse.evaluate import evaluate_task
from actsparse.models.loading import load_model
from actsparse.tasks import get_task, select_docs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--tasks", default="arc_easy,hellaswag")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    worst = 1.0
    for name in args.tasks.split(","):
        task = get_task(name)
        ids = select_docs(task, args.limit, 0)
        results, seconds = {}, {}
        for packing in (True, False):
            start = time.perf_counter()
            results[packing], _ = evaluate_task(
                model, tokenizer, task, ids, batch_size=args.batch_size, packing=packing
            )
            seconds[packing] = time.perf_counter() - start
        pairs = zip(results[True].docs, results[False].docs, strict=True)
        equal = sum(a.metrics == b.metrics for a, b in pairs) / len(ids)
        worst = min(worst, equal)
        print(
            f"{args.model} {name}: {len(ids)} docs, packed {seconds[True]:.1f} s, cached {seconds[False]:.1f} s "
            f"({seconds[False] / seconds[True]:.2f}x), per-document metrics equal {equal:.3f}"
        )
    return 0 if worst == 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
