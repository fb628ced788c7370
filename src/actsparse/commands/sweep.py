"""`actsparse sweep`: dense baseline, then every (target, rule, value) on every task, resumable."""

from __future__ import annotations

import argparse
from pathlib import Path

from actsparse.diffusion.scoring import DiffusionOptions
from actsparse.executors import EXECUTORS
from actsparse.loading import DEFAULT_MODEL
from actsparse.search import DEFAULT_PRECISION
from actsparse.sweep import DEFAULT_LIMIT, DEFAULT_TARGETS, DEFAULT_TASKS, DEFAULT_VALUES, SEARCHES


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _limit(text: str) -> int | None:
    if text.strip().lower() in ("all", "none", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit takes a number of documents or 'all', got {text!r}") from None


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="alias, folder, .gguf file or hub id")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="comma-separated targets")
    p.add_argument(
        "--rules",
        default="top_p",
        help="comma-separated rules: top_p, top_k, max_p; the field's methods: threshold (values = target "
        "sparsities, calibrated per point), wina_top_p, wina_top_k, top_p_outlier (value p), predictor (value p)",
    )
    p.add_argument(
        "--values",
        default=None,
        help="comma-separated p (or f for top_k) in [0, 1], or 'paper' for the paper's 26-point grid "
        f"(default: {','.join(f'{v:g}' for v in DEFAULT_VALUES)}; with --search bisect: paper, the grid it scans)",
    )
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated task names")
    p.add_argument("--limit", type=_limit, default=DEFAULT_LIMIT, help="documents per task (seeded sample), or 'all'")
    p.add_argument("--seed", type=int, default=0, help="seed of the document sample and of the bootstrap")
    p.add_argument("--out", type=Path, default=Path("runs/sweep"), help="run folder (results.sqlite, summary.json)")
    p.add_argument("--accelerate", action="store_true", help="run sparse kernels (actsparse.accelerate)")
    p.add_argument("--backend", default="native", help="native (fast, with KL) or lm-eval (any lm-eval task)")
    p.add_argument("--batch-size", type=int, default=64, help="documents scored together")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
        help="bisect: go on between grid neighbours, on the value itself, down to --precision",
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


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from actsparse.store import RunStore
    from actsparse.sweep import PAPER_VALUES, SweepConfig, parse_values, run_sweep

    config = SweepConfig(
        model=args.model,
        targets=_names(args.targets),
        rules=_names(args.rules),
        values=parse_values(args.values)
        if args.values
        else PAPER_VALUES
        if args.search == "bisect"
        else DEFAULT_VALUES,
        tasks=_names(args.tasks),
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
    )
    console = Console(stderr=True)
    try:
        summary = run_sweep(config, show_progress=not args.no_progress)
    except KeyboardInterrupt:
        try:
            with RunStore.open(args.out, create=False) as store:
                stored = len(store.keys())
        except RuntimeError:
            stored = 0
        console.print(f"interrupted: {stored} points are stored in {args.out}; rerun the same command to resume")
        return 130
    console.print(f"{len(summary['points'])} points in {args.out}; critical sparsity:", highlight=False)
    for label, c in summary["critical_sparsity"].items():
        bound = "≥ " if c["lower_bound"] else ""
        console.print(
            f"  {label}: {bound}{c['value']:.1%} (95% CI {c['ci_low']:.1%}–{c['ci_high']:.1%}, "
            f"grid {c['grid_value']:.1%})",
            highlight=False,
        )
    for label, evaluated in summary["search"].get("evaluated", {}).items():
        values = ", ".join(f"{v:g}" for v, _, _ in evaluated)
        console.print(f"  {label}: bisection evaluated {len(evaluated)} values: {values}", highlight=False)
    console.print(f"next: actsparse report {args.out}", highlight=False)
    return 0
