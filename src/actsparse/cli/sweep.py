"""`actsparse sweep`: dense baseline, then every (target, rule, value) on every task, resumable."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from actsparse.cli.common import (
    add_model_argument,
    at_least,
    comma_list,
    make_console,
    one_of,
    parse_criterion,
    parse_limit,
    run_folder,
)
from actsparse.diffusion.options import DiffusionOptions
from actsparse.models.placement import add_dtypes_argument, add_placement_arguments
from actsparse.sparsity.registry import RULES
from actsparse.sparsity.spec import TARGETS
from actsparse.study.executors import EXECUTORS
from actsparse.study.search import DEFAULT_PRECISION
from actsparse.study.sweep import (
    BACKENDS,
    DEFAULT_LIMIT,
    DEFAULT_TARGETS,
    DEFAULT_TASKS,
    SEARCHES,
    SWEEP_RULES,
    SweepConfig,
)
from actsparse.tasks import TASK_NAMES


def _listed(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


def _tokens(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-tokens takes a number of tokens or 'auto', got {text!r}") from None


def _runtime_env(text: str) -> dict:
    """A JSON object, given inline or as the path of a .json file."""
    import json

    source = Path(text).read_text() if text.strip().endswith(".json") and Path(text).is_file() else text
    try:
        env = json.loads(source)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--runtime-env takes a JSON object or a .json file: {err}") from None
    if not isinstance(env, dict):
        raise argparse.ArgumentTypeError(f"--runtime-env takes a JSON object, got {type(env).__name__}")
    return env


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sweep",
        help="evaluate tasks densely and at every (target, rule, value); resumable",
        description="Run the dense baseline and each (target, rule, value) point on the same documents of each "
        "task, storing every point in OUT/results.sqlite as it finishes; rerun the same command to resume. "
        "Writes OUT/summary.json at the end; `actsparse report OUT` draws it. The defaults are the main job, "
        "sized for a 2-core CPU (under 15 minutes on smollm2-135m); --limit all --values paper for a study.",
    )
    add_model_argument(p)
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help=f"comma-separated: {one_of(TARGETS)}")
    p.add_argument(
        "--rules",
        default="top_p",
        help=f"comma-separated: {one_of(SWEEP_RULES)}. Each rule's value: "
        + "; ".join(f"{r.name}: {r.value} (default {_listed(r.sweep_values)})" for r in RULES.values()),
    )
    p.add_argument(
        "--values",
        default=None,
        help="comma-separated values in each rule's own unit (see --rules), or 'paper' for the paper's 26-point "
        "grid of p (default: each rule's own values; with --search bisect: each rule's own grid, which "
        "`actsparse study --estimate-only` lists)",
    )
    p.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated: {one_of(TASK_NAMES)} (with --backend lm-eval: any lm-evaluation-harness task)",
    )
    p.add_argument(
        "--limit", type=parse_limit, default=DEFAULT_LIMIT, help="documents per task (seeded sample), or 'all'"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the document sample and of the bootstrap")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder: results.sqlite, summary.json (default: runs/MODEL, the alias or the model's folder, "
        "file or repository name)",
    )
    p.add_argument("--accelerate", action="store_true", help="run sparse kernels (actsparse.speed.accelerate)")
    p.add_argument(
        "--backend", choices=BACKENDS, default="native", help="native (fast, with KL) or lm-eval (any lm-eval task)"
    )
    p.add_argument(
        "--batch-tokens",
        type=_tokens,
        default=None,
        help="tokens (padding included) of one forward, or auto: from free device memory on cuda, 4096 on cpu; "
        "halved and retried on out-of-memory, so no point is lost",
    )
    p.add_argument("--batch-size", type=int, default=None, help="documents scored together at most (default: no cap)")
    p.add_argument(
        "--resamples", type=at_least(10, "--resamples"), default=1000, help="bootstrap resamples for the intervals"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress (a bar in a terminal, else one line per point)"
    )
    add_placement_arguments(p)
    add_dtypes_argument(p)
    p.add_argument(
        "--criterion",
        default="task",
        help="also report the crossing of another criterion, named after it: agreement:0.99 (share of answers "
        "equal to dense) or kl:0.05 (mean KL to dense); the headline stays the paper's critical sparsity",
    )
    p.add_argument(
        "--until-ci",
        type=float,
        default=None,
        metavar="HALF_WIDTH",
        help="after the first --limit documents, add seeded batches of --limit more to the dense baseline and "
        "every point until every curve's critical sparsity (low-noise measure) has a 95%% interval of at most "
        "± HALF_WIDTH (e.g. 0.02), or the tasks run out; each batch is stored as it finishes",
    )
    methods = p.add_argument_group("methods (threshold, top_p_outlier, predictor)")
    methods.add_argument(
        "--allocation",
        default="uniform",
        help="threshold: uniform (the same sparsity in every layer) or greedy (TEAL's per-layer allocation)",
    )
    methods.add_argument(
        "--outlier-m", type=float, default=100.0, help="top_p_outlier: keep |v| > m × the row's median |v|"
    )
    methods.add_argument("--calibration", type=Path, help="calibration text file (default: the built-in text)")
    methods.add_argument("--calibration-tokens", type=int, default=4096, help="calibration tokens to read")
    methods.add_argument("--predictor-rank", type=int, default=64, help="predictor: rank of each layer's predictor")
    scale = p.add_argument_group("scale out")
    scale.add_argument(
        "--executor", choices=EXECUTORS, default="local", help="local: in this process; ray: a Ray task per point"
    )
    scale.add_argument("--address", default=None, help="Ray cluster address; none: start a local Ray instance")
    scale.add_argument("--gpus-per-point", type=float, default=0.0, help="GPUs each Ray task declares")
    scale.add_argument("--cpus-per-point", type=float, default=1.0, help="CPUs each Ray task declares")
    scale.add_argument(
        "--runtime-env",
        type=_runtime_env,
        help="Ray runtime environment of each task, as JSON or a .json file "
        '(e.g. \'{"pip": ["actsparse"], "env_vars": {"HF_HUB_OFFLINE": "1"}}\')',
    )
    scale.add_argument(
        "--device-map", default=None, help="e.g. auto: spread a model larger than one GPU over several (accelerate)"
    )
    scale.add_argument(
        "--search",
        choices=SEARCHES,
        default="grid",
        help="grid: every value; bisect: scan every 4th value from the dense end, then bisect over the values "
        "between to --precision (the full grid's answer, for a fraction of its points)",
    )
    scale.add_argument(
        "--precision",
        type=float,
        default=DEFAULT_PRECISION,
        help="bisect: stop when the bracketing points differ by at most this much achieved sparsity (0.02 = 2 points)"
        " or are neighbours on the grid",
    )
    scale.add_argument(
        "--refine",
        action="store_true",
        help="bisect: go on between grid neighbours, on the value itself, down to --precision (only with bisect)",
    )
    defaults = DiffusionOptions()
    diffusion = p.add_argument_group("diffusion LLMs (LLaDA, diffusion_gemma)")
    diffusion.add_argument(
        "--mc-samples", type=int, default=defaults.mc_samples, help="Monte-Carlo samples per masked likelihood"
    )
    diffusion.add_argument(
        "--gen-length", type=int, default=defaults.gen_length, help="tokens generated for generation tasks"
    )
    diffusion.add_argument(
        "--diffusion-steps", type=int, default=defaults.steps, help="denoising steps of a generation"
    )
    diffusion.add_argument(
        "--block-length", type=int, default=defaults.block_length, help="tokens unmasked block by block"
    )
    return p


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `SweepConfig` fields that sweep and study take from their arguments alike: tokens of a forward,
    where the model runs, and the command line (provenance)."""
    return dict(batch_tokens=args.batch_tokens, device=args.device, dtype=args.dtype, argv=getattr(args, "argv", None))


def config_from_args(args: argparse.Namespace):
    """The `SweepConfig` of sweep's arguments (study shares it)."""
    from actsparse.study.sweep import SweepConfig, parse_values

    if args.values is not None and not args.values.strip(" ,"):
        raise ValueError("--values is empty: give values, 'paper', or leave the option out for the defaults")
    if args.refine and args.search != "bisect":
        raise ValueError("--refine refines a bisection: add --search bisect, or leave --refine out")
    return SweepConfig(
        model=args.model,
        targets=comma_list(args.targets),
        rules=comma_list(args.rules),
        values=None if args.values is None else parse_values(args.values),
        tasks=comma_list(args.tasks),
        limit=args.limit,
        seed=args.seed,
        out=args.out,
        accelerate=args.accelerate,
        backend=args.backend,
        batch_size=args.batch_size,
        resamples=args.resamples,
        executor=args.executor,
        address=args.address,
        gpus_per_point=args.gpus_per_point,
        cpus_per_point=args.cpus_per_point,
        runtime_env=args.runtime_env,
        device_map=args.device_map,
        search=args.search,
        precision=args.precision,
        refine=args.refine,
        until_ci=args.until_ci,
        allocation=args.allocation,
        outlier_m=args.outlier_m,
        calibration=args.calibration,
        calibration_tokens=args.calibration_tokens,
        predictor_rank=args.predictor_rank,
        diffusion=DiffusionOptions(
            mc_samples=args.mc_samples,
            gen_length=args.gen_length,
            steps=args.diffusion_steps,
            block_length=args.block_length,
        ),
        **run_options(args),
    )


def run(args: argparse.Namespace) -> int:
    from actsparse.models.placement import quiet_libraries
    from actsparse.study.store import RunStore, check_settings, check_writable
    from actsparse.study.sweep import UNBOUND_WITH_POINTS, run_sweep

    if args.dtypes and args.dtype != "auto":
        raise ValueError("give --dtype or --dtypes, not both")
    args.out = args.out or run_folder(args.model)
    config = config_from_args(args)
    console = make_console(stderr=True)
    if args.dtypes:
        quiet_libraries(args.verbose)
        return _run_dtypes(args, config, console)
    config.validate()  # before transformers is imported (quiet_libraries): a bad argument answers at once
    criterion = parse_criterion(args.criterion)
    quiet_libraries(args.verbose)
    check_writable(config.out, create=False)
    # others stored there: refused before loading
    bound_settings = check_settings(config.out, config.settings(), UNBOUND_WITH_POINTS)
    model, tokenizer = (None, None) if bound_settings.get("model") == config.model else _load_first(config)
    if config.search == "grid":
        _record_plan(config)
    try:
        summary = run_sweep(config, model, tokenizer, show_progress=not args.no_progress)
    except KeyboardInterrupt:
        try:
            with RunStore.open(args.out, create=False) as store:
                stored = len(store.keys())
        except RuntimeError:
            stored = 0
        console.print(f"interrupted: {stored} points are stored in {args.out}; rerun the same command to resume")
        return 130
    if criterion is not None:
        from actsparse.analysis import write_summary

        summary = write_summary(args.out, resamples=config.resamples, seed=config.seed, criterion=criterion)
    print_summary(console, summary, str(args.out))
    for label, evaluated in summary["search"].get("evaluated", {}).items():
        values = ", ".join(f"{v:g}" for v, _, _ in evaluated)
        console.print(f"  {label}: bisection evaluated {len(evaluated)} values: {values}", highlight=False)
    console.print(f"next: actsparse report {args.out}", highlight=False)
    return 0


def _load_first(config: SweepConfig) -> tuple[Any, Any]:
    """Load the model before the run folder is bound to it, so that a mistyped, missing or corrupt model
    leaves nothing behind that would refuse the corrected command (a folder already bound to this model
    loaded it before: the caller skips this, and a finished sweep reruns without loading it at all).

    Local executor: (model, tokenizer), handed to the sweep. Ray: the workers load it; here it is only
    resolved and its configuration read (a GGUF file is converted, which reads it whole): (None, None).
    """
    from actsparse.models import loading

    if config.executor != "local":
        loading.check_model(config.model)
        return None, None
    where = config.placement
    return loading.load_model(config.model, dtype=where.dtype, device=where.device, device_map=config.device_map)


def _record_plan(config: SweepConfig) -> None:
    """Add this sweep's (target, rule, value) points to those the folder plans, so that the report of a
    partial run can say which points are missing (a bisection picks its values as it goes: not recorded)."""
    from actsparse.study.store import RunStore

    with RunStore.open(config.out) as store:
        known = [tuple(p) for p in store.get_meta("planned") or []]
        new = [(t, r, float(v)) for t in config.targets for r in config.rules for v in config.values_for(r)]
        points = known + [p for p in new if p not in known]
        if points != known:
            store.set_meta("planned", [list(p) for p in points])


def _run_dtypes(args: argparse.Namespace, config, console) -> int:
    """`--dtypes`: one sweep per dtype in OUT/DTYPE, then the comparison (OUT/summary.json)."""
    from actsparse.study.precision import run_dtypes_sweep

    try:
        summary = run_dtypes_sweep(config, args.dtypes, show_progress=not args.no_progress)
    except KeyboardInterrupt:
        console.print(f"interrupted: rerun the same command to resume the sweeps in {args.out}/DTYPE")
        return 130
    console.print(f"{', '.join(summary['dtypes'])} in {args.out}; critical sparsity by dtype:", highlight=False)
    for label, by_dtype in summary["critical_sparsity"].items():
        cells = []
        for dtype, c in by_dtype.items():
            bound = "≥ " if c["lower_bound"] else ""
            cells.append(f"{dtype} {bound}{c['value']:.1%} ({c['ci_low']:.1%}–{c['ci_high']:.1%})")
        console.print(f"  {label}: " + "; ".join(cells), highlight=False)
        for pair, d in summary["differences"].get(label, {}).items():
            console.print(
                f"    {pair}: {d['value']:+.1%} (95% paired CI {d['ci_low']:+.1%} to {d['ci_high']:+.1%})",
                highlight=False,
            )
            if d.get("verdict"):
                console.print(f"    {d['verdict']}", highlight=False)
    console.print(f"next: actsparse report {args.out}", highlight=False)
    return 0


def _interval(c: dict) -> str:
    """'≥ 12.3% (95% CI 10.0%–15.0%, grid 10.0%)' of a critical-sparsity record."""

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{x:.1%}"

    bound = "≥ " if c["lower_bound"] else ""
    grid = "dense" if c.get("grid_param") is None else pct(c["grid_value"])
    return f"{bound}{pct(c['value'])} (95% CI {pct(c['ci_low'])}–{pct(c['ci_high'])}, grid {grid})"


def print_summary(console: Any, summary: dict, out: str) -> None:
    """What a finished sweep prints: the paper's critical sparsity per curve first, then the verdicts of
    the comparisons by damage at matched sparsity, then a named criterion's crossing if one was asked for."""
    console.print(
        f"{len(summary['points'])} points in {out}; critical sparsity (the paper's: sparse / dense task metric, "
        "mean over tasks, ≥ 99%):",
        highlight=False,
    )
    for label, c in summary["critical_sparsity"].items():
        console.print(f"  {label}: {_interval(c)}", highlight=False, markup=False)
    if summary.get("comparisons"):
        console.print("comparisons (critical sparsity, then damage at matched sparsity):", highlight=False)
        for comparison in summary["comparisons"]:
            console.print(f"  {comparison['verdict']}", highlight=False, markup=False)
    extra = summary.get("criterion")
    if extra:
        console.print(f"{extra['name']} (not the paper's critical sparsity):", highlight=False, markup=False)
        for label, c in extra["crossing"].items():
            console.print(f"  {label}: {_interval(c)}", highlight=False, markup=False)
