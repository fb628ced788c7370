"""The sweep: the dense baseline of every task, then each (target, rule, value, task) point, on the same
documents, each point stored as soon as it finishes so that a rerun resumes where a sweep stopped.

    RUN_DIR/results.sqlite   points and per-document scores (`actsparse.study.store`)
    RUN_DIR/dense/TASK.ref   the dense reference behind each sparse point's KL
    RUN_DIR/summary.json     the analysis (`actsparse.analysis`), rewritten at the end of every run
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from actsparse.diffusion.options import DiffusionOptions
from actsparse.models.loading import DEFAULT_MODEL
from actsparse.sparsity.registry import RULE_NAMES, RULES, get_rule
from actsparse.sparsity.spec import TARGETS
from actsparse.study.executors import Executor, LocalExecutor, PointContext, make_executor
from actsparse.study.progress import SweepProgress
from actsparse.study.search import DEFAULT_PRECISION, PAPER_GRID
from actsparse.study.store import PointKey, RunStore, StoreError, atomic_path, check_writable, reference_path

PAPER_VALUES: tuple[float, ...] = PAPER_GRID
"""The paper's grid of p (SPEC §4), 26 points (defined in the registry, as top_p's own grid)."""

DEFAULT_VALUES: tuple[float, ...] = get_rule("top_p").sweep_values
"""top_p's default values (each rule has its own: `Rule.sweep_values` in `actsparse.sparsity.registry`)."""

DEFAULT_TARGETS: tuple[str, ...] = ("input", "gate", "up", "intermediate")
DEFAULT_TASKS: tuple[str, ...] = ("arc_easy", "piqa")
DEFAULT_LIMIT = 80
"""Defaults are the main job: all four targets × 3 values × 2 tasks × 80 documents on smollm2-135m,
under 15 minutes on 2 CPU cores. For a study use `--limit all --values paper` and more tasks: paired
statistics help, but 80 documents still leave intervals of several points of sparsity."""

SWEEP_RULES: tuple[str, ...] = RULE_NAMES
"""Rules a sweep can grid over (the registry's); for `threshold` each value is a target sparsity."""

BACKENDS = ("native", "lm-eval")
SEARCHES = ("grid", "bisect")


@dataclass
class SweepConfig:
    """Everything a sweep needs; `tasks` holds names or `Task` objects (tests, custom data)."""

    model: str = DEFAULT_MODEL
    targets: Sequence[str] = DEFAULT_TARGETS
    rules: Sequence[str] = ("top_p",)
    values: Sequence[float] | None = None  # None: each rule's own (`Rule.sweep_values`; bisect: `Rule.grid`)
    tasks: Sequence[Any] = DEFAULT_TASKS
    limit: int | None = DEFAULT_LIMIT
    seed: int = 0
    out: Path = Path("runs/sweep")
    accelerate: bool = False
    backend: str = "native"
    batch_size: int | None = None  # documents scored together at most (None: as many as `batch_tokens` hold)
    batch_tokens: int | None = None  # tokens of one forward (None: from free device memory on CUDA, else 4096)
    diffusion: DiffusionOptions = field(default_factory=DiffusionOptions)  # diffusion LLMs: MC samples, steps
    resamples: int = 1000
    executor: str = "local"  # 'local' (in this process) or 'ray' (a Ray task per point)
    address: str | None = None  # Ray cluster address (None: a local Ray instance)
    gpus_per_point: float = 0.0
    cpus_per_point: float = 1.0
    runtime_env: dict[str, Any] | None = None  # Ray: each task's runtime environment (pip, env_vars, ...)
    device_map: str | None = None  # e.g. 'auto': a model larger than one GPU, through accelerate
    search: str = "grid"  # 'grid' (every value) or 'bisect' (`actsparse.study.search`, values = the scan grid)
    precision: float = DEFAULT_PRECISION  # bisect: width of the final bracket, in achieved sparsity
    refine: bool = False  # bisect: go on between grid neighbours, on the value itself
    device: str = "auto"  # auto, cpu, cuda, cuda:N (`actsparse.models.placement`); bound to the run folder
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16; bound too
    argv: Sequence[str] | None = None  # the command line that started the run (provenance), if any
    until_ci: float | None = None  # add batches of --limit documents until every half-width ≤ this (adaptive.py)
    allocation: str = "uniform"  # threshold: 'uniform' or TEAL's 'greedy' per-layer allocation
    outlier_m: float = 100.0  # top_p_outlier: entries above m × the row median are always kept
    calibration: Path | None = None  # threshold, predictor: calibration text (None: the built-in one)
    calibration_tokens: int = 4096
    predictor_rank: int = 64
    _tasks: list[Any] = field(default_factory=list, init=False, repr=False)
    _placement: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    def validate(self) -> None:
        """Check every setting (and resolve task names) before any model work; ValueError if one is bad."""
        for name, allowed, given in (("target", TARGETS, self.targets), ("rule", SWEEP_RULES, self.rules)):
            if not given:
                raise ValueError(f"no {name}s given; choose from {', '.join(allowed)}")
            unknown = [g for g in given if g not in allowed]
            if unknown:
                raise ValueError(f"unknown {name} {unknown[0]!r}; choose from {', '.join(allowed)}")
        if self.values is not None and not self.values:
            raise ValueError("no values given")
        if self.search not in SEARCHES:
            raise ValueError(f"unknown search {self.search!r}; choose from {', '.join(SEARCHES)}")
        for name in self.rules:
            rule = get_rule(name)
            for target in self.targets:
                rule.check_target(target)
            for value in self.values_for(name):
                rule.check_value(value)
            if self.search == "bisect":
                from actsparse.study.search import Bisection

                Bisection(name, self.precision, self.values_for(name), refine=self.refine)
        unaccelerated = [name for name in self.rules if get_rule(name).needs]  # calibrated or fitted per point
        if self.accelerate and unaccelerated:
            plain = [name for name, rule in RULES.items() if not rule.needs]
            raise ValueError(f"--accelerate runs {', '.join(plain)} only, not {', '.join(unaccelerated)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1 (or 'all'), got {self.limit}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.batch_tokens is not None and self.batch_tokens < 1:
            raise ValueError(f"--batch-tokens must be at least 1 (or auto), got {self.batch_tokens}")
        if not self.tasks:
            raise ValueError("no tasks given")
        if self.gpus_per_point < 0 or self.cpus_per_point <= 0:
            raise ValueError("--gpus-per-point must be ≥ 0 and --cpus-per-point > 0")
        if not 0 < self.precision < 1:
            raise ValueError(f"--precision is a fraction of sparsity in (0, 1), got {self.precision}")
        if self.until_ci is not None:
            if not 0 < self.until_ci < 1:
                raise ValueError(f"--until-ci is a half-width in sparsity in (0, 1), got {self.until_ci}")
            if self.limit is None:
                raise ValueError("--until-ci adds documents beyond --limit: give a --limit, not 'all'")
            if self.backend != "native":
                raise ValueError("--until-ci needs the native backend (it adds documents to the dense reference)")
        self._tasks = [self._resolve(t) for t in self.tasks]
        names = [_name(t) for t in self._tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"a task is listed twice: {', '.join(names)}")
        # the checks above import nothing heavy, so that a bad argument answers at once; these import torch
        # (methods, the device), Ray or the sparse kernels
        self.method_options().validate()
        self._placement = self._resolve_placement()
        self.executor_for()  # an unknown executor, or Ray options without Ray, is refused here
        if self.accelerate:
            try:
                import actsparse.speed.accelerate  # noqa: F401
            except ImportError as err:
                raise ValueError(f"--accelerate is not available here: {err}") from None

    def _resolve(self, task: Any) -> Any:
        if not isinstance(task, str):
            return task
        if self.backend == "lm-eval":
            from actsparse.evaluate.lm_eval_bridge import lm_eval_task_exists

            if not lm_eval_task_exists(task):
                raise ValueError(f"lm-evaluation-harness has no task {task!r}")
            return task
        from actsparse.tasks import get_task

        return get_task(task)

    def _resolve_placement(self) -> Any:
        """Device and dtype on the machine the points run on: here, or (Ray) on workers that have GPUs
        when `gpus_per_point` > 0, where the driver cannot check them."""
        from actsparse.models import placement

        if self.executor == "local":
            return placement.resolve(self.device, self.dtype)
        device = placement.parse_device(self.device)
        if device == "auto":
            device = "cuda" if self.gpus_per_point > 0 else "cpu"
        return placement.Placement(device, placement.resolve_dtype(self.dtype, device))

    @property
    def placement(self) -> Any:
        """The resolved `Placement` (device, dtype) of the points."""
        if self._placement is None:
            self.validate()
        return self._placement

    @property
    def resolved_tasks(self) -> list[Any]:
        if not self._tasks:
            self.validate()
        return self._tasks

    def values_for(self, rule: str) -> tuple[float, ...]:
        """The values of `rule` this sweep evaluates (grid) or scans (bisect): the given ones, else the rule's own."""
        if self.values is not None:
            return tuple(float(v) for v in self.values)
        own = get_rule(rule)
        return own.grid if self.search == "bisect" else own.sweep_values

    def method_options(self) -> Any:
        """The methods' settings (`actsparse.methods.MethodOptions`), caching into the run folder."""
        from actsparse.methods import MethodOptions

        return MethodOptions(
            self.allocation, self.outlier_m, self.calibration, self.calibration_tokens, self.predictor_rank, self.out
        )

    def executor_for(self) -> Executor:
        """The executor these settings name (`executors.make_executor`, which checks its options)."""
        return make_executor(self.executor, self.address, self.gpus_per_point, self.cpus_per_point, self.runtime_env)

    def settings(self) -> dict[str, Any]:
        """What must stay the same for every run stored in one folder (so that points compare)."""
        return {
            "model": self.model,
            "limit": self.limit,
            "seed": self.seed,
            "backend": self.backend,
            "accelerate": self.accelerate,
            "diffusion": asdict(self.diffusion),
            **self.placement.binding(),  # device kind and dtype: one folder never mixes precisions
            **self.method_options().settings(list(self.rules)),
        }


def _name(task: Any) -> str:
    return task if isinstance(task, str) else task.name


def parse_values(text: str) -> tuple[float, ...]:
    """'paper' → the paper's 26 points; '1,0.9,0.7' → those values (checked later against the rule)."""
    if text.strip().lower() == "paper":
        return PAPER_VALUES
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--values must be 'paper' or numbers separated by commas, got {text!r}") from None
    if len(set(values)) != len(values):
        raise ValueError(f"--values lists a value twice: {text}")
    return values


def plan(config: SweepConfig) -> list[PointKey]:
    """Every point of the sweep in the order it runs: dense baselines first."""
    names = [_name(t) for t in config.resolved_tasks]
    dense = [PointKey.dense(t) for t in names]
    sparse = [
        PointKey(target, rule, float(value), task)
        for target in config.targets
        for rule in config.rules
        for value in config.values_for(rule)
        for task in names
    ]
    return dense + sparse


UNBOUND_WITH_POINTS = {"dtype": "float32"}
"""Settings of a folder that stores points from before the setting was bound (`store.check_settings`)."""


def prepare(config: SweepConfig) -> tuple[RunStore, dict[str, list[int] | None]]:
    """Validate, open the store and fix each task's documents (all before loading a model).

    A folder without points is bound to these settings by the first point stored, not here: a run that
    fails before it (a model whose dense baseline is not finite) leaves the folder free for another model.
    """
    config.validate()
    if (config.out / "precision.json").exists():
        raise StoreError(f"{config.out} holds a --dtypes sweep (one folder per dtype): rerun it with --dtypes")
    check_writable(config.out)
    store = RunStore.open(config.out)
    try:
        if store.get_meta("dtype") is None and store.keys():  # a folder from before dtypes were bound
            store.set_meta("dtype", UNBOUND_WITH_POINTS["dtype"])
        for key, value in config.settings().items():
            store.bind(key, value, with_first_point=True)
        doc_ids: dict[str, list[int] | None] = {}
        for task in config.resolved_tasks:
            from actsparse.tasks import TASK_NAMES, get_task, select_docs

            if isinstance(task, str) and task not in TASK_NAMES:  # another lm-eval task: its first documents
                ids = None if config.limit is None else list(range(config.limit))
            else:  # the same seeded sample with either backend
                ids = select_docs(get_task(task) if isinstance(task, str) else task, config.limit, config.seed)
            name = _name(task)
            store.bind(f"docs/{name}", ids, with_first_point=True)
            doc_ids[name] = ids
        known = (store.get_meta("settings") or {}).get("tasks", [])
        tasks = known + [t for t in doc_ids if t not in known]
        store.set_meta("settings", {**config.settings(), "tasks": tasks}, with_first_point=True)
        from actsparse.study.provenance import provenance

        where = config.placement
        record = provenance(config.model, where.device, where.dtype, config.argv)
        store.set_meta("provenance", record, with_first_point=True)
    except BaseException:
        store.close()
        raise
    return store, doc_ids


def run_sweep(
    config: SweepConfig,
    model: Any = None,
    tokenizer: Any = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the sweep into `config.out`; return the summary that is also written there.

    Points run on `config.executor` (in this process, or as Ray tasks); this process alone stores them.
    """
    from actsparse.analysis import write_summary

    store, doc_ids = prepare(config)
    executor = config.executor_for()
    try:
        with store:
            driver = _Driver(config, store, doc_ids, executor, model, tokenizer)
            if config.search == "bisect":
                driver.bisect(show_progress)
            else:
                store.set_meta("search", {"method": "grid"})
                driver.grid(show_progress)
            if config.until_ci is not None:
                from actsparse.study.adaptive import until_ci

                with SweepProgress(show_progress, prefix=f"{driver.label} until-ci") as progress:
                    until_ci(driver, config.until_ci, progress.advance)
    finally:
        executor.close()
    return write_summary(config.out, resamples=config.resamples, seed=config.seed)


class _Driver:
    """Sends pending points to the executor and stores each one as it comes back."""

    def __init__(
        self,
        config: SweepConfig,
        store: RunStore,
        doc_ids: dict[str, list[int] | None],
        executor: Executor,
        model: Any,
        tokenizer: Any,
    ):
        self.config, self.store, self.doc_ids, self.executor = config, store, doc_ids, executor
        self.given = None if model is None else (model, tokenizer)
        self.context: PointContext | None = None
        self.label = "sweep" if config.placement.dtype == "float32" else f"sweep {config.placement.dtype}"

    def grid(self, show_progress: bool) -> None:
        pending = self.pending(plan(self.config))
        total = sum(self.n_docs(k) for k in pending)
        with SweepProgress(show_progress, len(pending), total, prefix=self.label) as progress:
            self.run(pending, progress)

    def bisect(self, show_progress: bool) -> None:
        """Search each (target, rule) by bisection; record which values were evaluated, in order."""
        from actsparse.study.search import bisect_curves

        config = self.config
        names = list(self.doc_ids)
        curves = [(target, rule) for target in config.targets for rule in config.rules]
        with SweepProgress(show_progress, prefix=self.label) as progress:
            self.run(self.pending([PointKey.dense(t) for t in names]), progress)
            dense = {t: self.store.get(PointKey.dense(t)) for t in names}

            def measure(points: Sequence[tuple[str, str, float]]) -> dict[tuple[str, str, float], tuple[float, float]]:
                keys = [PointKey(target, rule, value, t) for target, rule, value in points for t in names]
                self.run(self.pending(keys), progress)
                return {p: _measured(self.store, p, dense) for p in points}

            grids = {rule: config.values_for(rule) for rule in config.rules}
            found = bisect_curves(curves, measure, config.precision, refine=config.refine, grids=grids)
        self.store.set_meta(
            "search",
            {
                "method": "bisect",
                "precision": config.precision,
                "refine": config.refine,
                "unit": "achieved sparsity",
                "grid": max((list(g) for g in grids.values()), key=len),  # the longest: a report names one grid
                "grids": {rule: list(grid) for rule, grid in grids.items()},
                "evaluated": {
                    f"{target}/{rule}": [[v, s, p] for v, (s, p) in b.points.items()]
                    for (target, rule), b in found.items()
                },
            },
        )

    def pending(self, keys: Sequence[PointKey]) -> list[PointKey]:
        """The keys not stored yet, plus the dense ones whose reference file is missing (rerun, not restored)."""
        done = self.store.keys()
        native = self.config.backend == "native"
        sparse_tasks = {k.task for k in keys if not k.is_dense and k not in done}
        missing = {t for t in sparse_tasks if native and not reference_path(self.config.out, t).exists()}
        dense = [PointKey.dense(t) for t in sorted(missing) if PointKey.dense(t) not in keys]
        return dense + [k for k in keys if k not in done or (k.is_dense and k.task in missing)]

    def n_docs(self, key: PointKey) -> int:
        ids = self.doc_ids[key.task]
        return len(ids) if ids is not None else 0

    def run(self, keys: Sequence[PointKey], progress: SweepProgress) -> None:
        """Evaluate `keys` (dense ones first: their references feed the sparse ones) and store them."""
        from actsparse.study.executors import evaluate_point

        for phase in ([k for k in keys if k.is_dense], [k for k in keys if not k.is_dense]):
            if not phase:
                continue
            context = self.point_context(needs_references=not phase[0].is_dense)
            for key, outcome in self.executor.map(evaluate_point, phase, context, progress.advance):
                if outcome.reference is not None:
                    path = reference_path(self.config.out, key.task)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = atomic_path(path)
                    try:
                        outcome.reference.save(tmp)
                        os.replace(tmp, path)
                    finally:  # a full disk leaves no partial file behind
                        tmp.unlink(missing_ok=True)
                    context.references[key.task] = outcome.reference
                self.store.put(key, outcome.result, outcome.seconds)  # no-op if the dense point was stored
                if not self.executor.reports_documents:
                    progress.advance(self.n_docs(key))
                progress.point(_label(key), self.n_docs(key) or len(outcome.result.docs), outcome.seconds)

    def point_context(self, needs_references: bool) -> PointContext:
        """What the workers share: the model (in-process for the local executor), tasks, references."""

        config = self.config
        if self.context is None:
            where = config.placement
            model: Any = self.given
            remote = not isinstance(self.executor, LocalExecutor)
            if model is not None:
                model = _placed(model, where)
            elif not remote:
                from actsparse.models.loading import load_model

                model = load_model(config.model, where.dtype, where.device, device_map=config.device_map)
            self.context = PointContext(
                model=config.model if model is None else model,
                tasks={_name(t): t for t in config.resolved_tasks},
                doc_ids=self.doc_ids,
                backend=config.backend,
                batch_size=config.batch_size,
                batch_tokens=config.batch_tokens,
                diffusion=config.diffusion,
                accelerate=config.accelerate,
                dtype=where.dtype,
                device=where.device,
                device_map=config.device_map,
                methods=config.method_options(),
            )
        if needs_references and config.backend == "native":
            from actsparse.evaluate import DenseReference

            for task in self.doc_ids:
                if task not in self.context.references and reference_path(config.out, task).exists():
                    self.context.references[task] = DenseReference.load(reference_path(config.out, task))
        return self.context


def _measured(store: RunStore, point: tuple[str, str, float], dense: dict[str, Any]) -> tuple[float, float]:
    """(achieved sparsity, normalised performance) of a stored (target, rule, value) over every task, as
    the headline measures them (`analysis.point_measure`)."""
    from actsparse.analysis import point_measure

    target, rule, value = point
    results = {task: r for task in dense if (r := store.get(PointKey(target, rule, value, task))) is not None}
    return point_measure(dense, results)


def _label(key: PointKey) -> str:
    return f"dense {key.task}" if key.is_dense else f"{key.target}/{key.rule} {key.value:g} {key.task}"


def _placed(given: tuple[Any, Any], where: Any) -> tuple[Any, Any]:
    """A given (model, tokenizer) in the sweep's dtype: itself when it already is, else a converted copy
    (so that a `--dtypes` sweep of an in-memory model leaves the caller's model as it was)."""
    import copy

    from actsparse.models.placement import device_kind

    model, tokenizer = given
    device = next(model.parameters()).device
    if getattr(model, "dtype", None) == where.torch_dtype and device_kind(device.type) == device_kind(where.device):
        return model, tokenizer
    target = device if device_kind(device.type) == device_kind(where.device) else where.device
    return copy.deepcopy(model).to(device=target, dtype=where.torch_dtype), tokenizer


__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_TASKS",
    "DEFAULT_VALUES",
    "PAPER_VALUES",
    "StoreError",
    "SweepConfig",
    "parse_values",
    "plan",
    "prepare",
    "run_sweep",
]
