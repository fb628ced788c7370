"""`actsparse study --model M`: the paper's study as one resumable sweep: each rule's own grid (top_p's is
the paper's 26 values of p; searched by bisection unless --search grid), the four targets, top_p and max_p,
the ten tasks with every validation document. Before it starts, a short timed probe (a few documents per
task, dense and sparse) gives an estimate of its run time, printed with each rule's grid and recorded in
OUT/estimate.json."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from actsparse.cli.common import add_model_argument, comma_list, make_console, parse_limit, run_folder
from actsparse.models.placement import add_placement_arguments
from actsparse.sparsity.registry import RULE_NAMES
from actsparse.study.sweep import DEFAULT_TARGETS, SEARCHES

STUDY_RULES = ("top_p", "max_p")
PROBE_SPEC = ("intermediate", "top_p", 0.9)
"""The sparse point the probe times (the instrumentation costs about the same for every point)."""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from actsparse.tasks import TASK_NAMES

    p = sub.add_parser(
        "study",
        help="the paper's study on one model: each rule's grid, 4 targets, top_p and max_p, 10 tasks, every document",
        description=__doc__,
    )
    add_model_argument(p)
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/study-MODEL)")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated targets")
    p.add_argument(
        "--rules",
        default=",".join(STUDY_RULES),
        help=f"comma-separated: {', '.join(RULE_NAMES)}; each is searched on its own grid (listed by --estimate-only)",
    )
    p.add_argument("--tasks", default=",".join(TASK_NAMES), help="comma-separated task names")
    p.add_argument("--limit", default="all", help="documents per task, or 'all' (the study: every validation document)")
    p.add_argument(
        "--search", choices=SEARCHES, default="bisect", help="bisect (default) or grid: every value of each rule's grid"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (and of a --limit sample)")
    p.add_argument("--batch-tokens", type=int, default=None, help="tokens of one forward (default: auto)")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--probe-docs", type=int, default=4, help="documents per task the timed probe scores")
    p.add_argument("--estimate-only", action="store_true", help="print and record the estimate, then stop")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    add_placement_arguments(p)
    return p


def study_config(args: argparse.Namespace) -> Any:
    from actsparse.cli.sweep import run_options
    from actsparse.study.sweep import SweepConfig

    out = args.out or run_folder(args.model, "study-")
    return SweepConfig(
        model=args.model,
        targets=comma_list(args.targets),
        rules=comma_list(args.rules),
        values=None,  # each rule's own grid
        tasks=comma_list(args.tasks),
        limit=parse_limit(str(args.limit)),
        seed=args.seed,
        out=out,
        resamples=args.resamples,
        search=args.search,
        **run_options(args),
    )


def expected_values(config: Any, rule: str) -> tuple[int, int]:
    """(typical, most) values one curve of `rule` evaluates: its whole grid for a grid search; for bisection
    a scan of every 4th value from the dense end then about log2(4) steps (typical: a crossing half-way)."""
    from actsparse.study.search import STRIDE, Bisection

    grid = config.values_for(rule)
    if config.search == "grid":
        return len(grid), len(grid)
    scan = len(Bisection(rule, grid=grid).scan)
    steps = math.ceil(math.log2(STRIDE))
    return min(len(grid), math.ceil(scan / 2) + steps), min(len(grid), scan + steps)


def probe(model: Any, tokenizer: Any, config: Any, doc_ids: dict[str, list[int] | None], n: int) -> dict[str, Any]:
    """Seconds per document of each task, dense and at one sparse point, on its first `n` documents."""
    import torch

    from actsparse.evaluate import evaluate_task
    from actsparse.sparsity.instrument import sparsify
    from actsparse.sparsity.spec import SparsitySpec
    from actsparse.tasks import select_docs

    rates: dict[str, Any] = {}
    warm = True
    for task in config.resolved_tasks:
        ids = doc_ids[task.name]
        part = list(ids if ids is not None else select_docs(task, None))[:n]
        kwargs = dict(batch_tokens=config.batch_tokens)
        with torch.no_grad():
            if warm:  # first forward: kernels, allocator; not counted
                evaluate_task(model, tokenizer, task, part[:1], **kwargs)
                warm = False
            start = time.perf_counter()
            _, reference = evaluate_task(model, tokenizer, task, part, **kwargs)
            dense = time.perf_counter() - start
            start = time.perf_counter()
            with sparsify(model, SparsitySpec(*PROBE_SPEC)):
                evaluate_task(model, tokenizer, task, part, reference=reference, **kwargs)
            sparse = time.perf_counter() - start
        rates[task.name] = {
            "docs": len(part),
            "dense_s_per_doc": dense / len(part),
            "sparse_s_per_doc": sparse / len(part),
        }
    return rates


def estimate(config: Any, doc_ids: dict[str, list[int] | None], rates: dict[str, Any]) -> dict[str, Any]:
    """The study's run time from the probe: dense once per task, then every curve's expected points."""
    per_rule = {rule: expected_values(config, rule) for rule in config.rules}
    typical = sum(t for t, _ in per_rule.values()) * len(config.targets)  # values over every curve
    most = sum(m for _, m in per_rule.values()) * len(config.targets)
    curves = len(config.targets) * len(config.rules)
    sizes = {t: len(ids) if ids is not None else 0 for t, ids in doc_ids.items()}
    dense = sum(sizes[t] * r["dense_s_per_doc"] for t, r in rates.items())
    sparse_per_value = sum(sizes[t] * r["sparse_s_per_doc"] for t, r in rates.items())
    return {
        "documents": sizes,
        "curves": curves,
        "values_per_curve": {
            "typical": typical / curves,
            "most": most / curves,
            "search": config.search,
            "by_rule": {rule: {"typical": t, "most": m} for rule, (t, m) in per_rule.items()},
        },
        "grids": {rule: list(config.values_for(rule)) for rule in config.rules},
        "seconds": {
            "typical": dense + typical * sparse_per_value,
            "most": dense + most * sparse_per_value,
        },
        "probe": rates,
        "note": "from a probe at a small batch: larger batches run faster, so the figures lean high",
    }


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def run(args: argparse.Namespace) -> int:
    from actsparse.models.loading import load_model
    from actsparse.models.placement import quiet_libraries
    from actsparse.sparsity.registry import RULES
    from actsparse.study.sweep import prepare, run_sweep

    if args.probe_docs < 1:
        raise ValueError(f"--probe-docs must be at least 1, got {args.probe_docs}")
    config = study_config(args)
    store, doc_ids = prepare(config)  # validates and binds the folder before any model work
    store.close()
    quiet_libraries(args.verbose)  # imports transformers: after the arguments are checked
    console = make_console(stderr=True)
    where = config.placement
    console.print(f"study of {config.model} on {where.device} in {where.dtype} → {config.out}", highlight=False)
    model, tokenizer = load_model(config.model, where.dtype, where.device)
    record = estimate(config, doc_ids, probe(model, tokenizer, config, doc_ids, args.probe_docs))
    record |= {"model": config.model, "device": where.device, "dtype": where.dtype, "created": time.time()}
    (config.out / "estimate.json").write_text(json.dumps(record, indent=2))
    seconds = record["seconds"]
    n_docs = sum(record["documents"].values())
    per_curve = record["values_per_curve"]
    console.print(
        f"estimate: {_hours(seconds['typical'])} (up to {_hours(seconds['most'])}) for {len(doc_ids)} tasks, "
        f"{n_docs} documents, {record['curves']} curves × {per_curve['typical']:.3g}–{per_curve['most']:.3g} "
        f"values ({config.search}); from a probe of {args.probe_docs} documents per task; recorded in "
        f"{config.out / 'estimate.json'}",
        highlight=False,
    )
    for rule, grid in record["grids"].items():
        console.print(f"  {RULES[rule].describe(grid)}", highlight=False, markup=False)
    if args.estimate_only:
        return 0
    summary = run_sweep(config, model, tokenizer, show_progress=not args.no_progress)
    for label, c in summary["critical_sparsity"].items():
        bound = "≥ " if c["lower_bound"] else ""
        console.print(
            f"  {label}: {bound}{c['value']:.1%} (95% CI {c['ci_low']:.1%}–{c['ci_high']:.1%})", highlight=False
        )
    console.print(f"next: actsparse report {config.out}", highlight=False)
    return 0
