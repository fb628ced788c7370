"""How sweep points run: in this process (`LocalExecutor`, the default) or as Ray tasks, one per point,
on a local machine or a cluster (`RayExecutor`).

Either way the driver alone writes `results.sqlite`: an executor only yields `(point, outcome)` pairs
as points finish. `evaluate_point` is the one function that evaluates a point, wherever it runs; a
Ray worker loads the model once and keeps it for every later point it is given.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from actsparse.evaluate.results import TaskResult
from actsparse.sparsity.spec import SparsitySpec
from actsparse.study.store import PointKey

Item = TypeVar("Item")
LM_EVAL_BATCH = 16
"""Requests per batch of the lm-eval backend when the sweep sets no --batch-size, on any device."""
Progress = Callable[[int], None]


@dataclass
class PointContext:
    """What every point of a sweep phase shares; a Ray worker receives it once and caches it."""

    model: str | tuple[Any, Any]  # a name for `load_model`, or an in-memory (model, tokenizer)
    tasks: dict[str, Any]  # task name → `Task` (native backend) or the name itself (lm-eval backend)
    doc_ids: dict[str, list[int] | None]  # task name → documents to score (None: the backend's own sample)
    references: dict[str, Any] = field(default_factory=dict)  # task → DenseReference (KL of sparse points)
    backend: str = "native"
    batch_size: int | None = None  # documents scored together at most (None: as many as the token budget holds)
    batch_tokens: int | None = None  # tokens of one forward (None: from free device memory on CUDA)
    diffusion: Any = None  # DiffusionOptions for diffusion LLMs (None: the defaults)
    accelerate: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    device_map: str | None = None  # e.g. 'auto': spread the model over the worker's GPUs (accelerate)
    methods: Any = None  # `methods.MethodOptions`: calibration text, allocation, m, cache folder


@dataclass
class PointOutcome:
    """A point's result, the dense reference a dense point produces (else None), and its run time."""

    result: TaskResult
    reference: Any = None
    seconds: float = 0.0


_MODEL: dict[tuple, tuple[Any, Any]] = {}
"""The model this process loaded last, by (name, dtype, device, device_map): one at a time."""


def _model(context: PointContext) -> tuple[Any, Any]:
    if not isinstance(context.model, str):
        return context.model
    key = (context.model, context.dtype, context.device, context.device_map)
    if key not in _MODEL:
        from actsparse.models.loading import load_model

        _MODEL.clear()  # free the previous model before loading the next one
        _MODEL[key] = load_model(context.model, context.dtype, context.device, device_map=context.device_map)
    return _MODEL[key]


def instrument(model: Any, spec: SparsitySpec, accelerate: bool = False) -> Any:
    """The context manager that runs `model` sparsified: `sparsify`, or the sparse kernels."""
    if accelerate:
        from actsparse.speed.accelerate import accelerate as accelerated

        return accelerated(model, spec)
    from actsparse.methods import sparsify

    return sparsify(model, spec)


def evaluate_point(key: PointKey, context: PointContext, progress: Progress | None = None) -> PointOutcome:
    """Evaluate one point (a task's dense baseline, or a (target, rule, value) on it); store nothing."""
    import torch

    model, tokenizer = _model(context)
    start = time.perf_counter()
    if key.is_dense:
        from actsparse.sparsity.instrument import finite_checked
        from actsparse.sparsity.rules import NonFiniteActivationError

        with torch.no_grad(), _dense_baseline(key.task), finite_checked(model):  # as every sparse point is
            result, reference = _evaluate(model, tokenizer, key.task, context, None, progress)
            if reference is not None and not all(bool(p.isfinite().all()) for _, p in reference.topk.values()):
                raise NonFiniteActivationError("NaN or Inf in the dense log-probabilities")
        return PointOutcome(result, reference, time.perf_counter() - start)
    reference = context.references.get(key.task) if context.backend == "native" else None
    if context.backend == "native" and reference is None:
        raise ValueError(f"no dense reference for task {key.task!r}: run its dense point first")
    from actsparse.methods import point_spec

    spec = point_spec(model, tokenizer, key.target, key.rule, key.value, context.methods)
    with torch.no_grad(), instrument(model, spec, context.accelerate) as stats:
        result, _ = _evaluate(model, tokenizer, key.task, context, reference, progress)
    result.sparsity = stats.to_dict()
    return PointOutcome(result, None, time.perf_counter() - start)


@contextlib.contextmanager
def _dense_baseline(task: str) -> Iterator[None]:
    """Say that it is the dense baseline of `task` that failed (and is not stored)."""
    from actsparse.sparsity.rules import NonFiniteActivationError

    try:
        yield
    except NonFiniteActivationError as err:
        raise NonFiniteActivationError(
            f"the dense baseline of {task!r} is not finite ({err}): the model itself is broken; nothing stored"
        ) from err


def _evaluate(
    model: Any, tokenizer: Any, task: str, context: PointContext, reference: Any, progress: Progress | None
) -> tuple[TaskResult, Any]:
    if context.backend == "lm-eval":
        from actsparse.evaluate.lm_eval_bridge import evaluate_lm_eval

        batch = context.batch_size or LM_EVAL_BATCH  # never 'auto': its probe forwards would count as sparsity
        result = evaluate_lm_eval(model, tokenizer, task, context.doc_ids[task], batch_size=batch)
        if progress is not None:
            progress(len(result.docs))
        return result, None
    from actsparse.evaluate import evaluate_task

    return evaluate_task(
        model,
        tokenizer,
        context.tasks[task],
        context.doc_ids[task],
        reference=reference,
        batch_size=context.batch_size,
        batch_tokens=context.batch_tokens,
        progress=progress,
        diffusion=context.diffusion,
    )


class Executor(Protocol):
    """Runs `fn(item, context, progress)` for every item; yields (item, result) as each one finishes."""

    reports_documents: bool  # whether `progress` is called per document (else the caller counts points)

    def map(
        self, fn: Callable[[Item, Any, Progress | None], Any], items: Sequence[Item], context: Any, progress: Progress
    ) -> Iterator[tuple[Item, Any]]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """In this process, one point after another, in the given order (the default)."""

    reports_documents = True

    def map(
        self, fn: Callable[[Item, Any, Progress | None], Any], items: Sequence[Item], context: Any, progress: Progress
    ) -> Iterator[tuple[Item, Any]]:
        for item in items:
            yield item, fn(item, context, progress)

    def close(self) -> None:
        pass


class PointLostError(RuntimeError):
    """A point's worker died more often than the retries allow."""


class RayExecutor:
    """Every point is a Ray task with declared resources; results return to the driver.

    A worker lost mid-point (crash, kill, node loss) loses only that point: Ray retries it
    `max_retries` times, then the driver submits it again up to `resubmits` times. An exception raised
    by the evaluation itself is not retried: it stops the sweep with its own message.
    """

    reports_documents = False

    def __init__(
        self,
        address: str | None = None,
        gpus_per_point: float = 0.0,
        cpus_per_point: float = 1.0,
        max_retries: int = 3,
        resubmits: int = 2,
        init_options: dict[str, Any] | None = None,
        runtime_env: dict[str, Any] | None = None,
    ):
        if gpus_per_point < 0 or cpus_per_point <= 0:
            raise ValueError(f"resources per point must be positive (GPUs {gpus_per_point}, CPUs {cpus_per_point})")
        self.address, self.gpus, self.cpus = address, gpus_per_point, cpus_per_point
        self.max_retries, self.resubmits = max_retries, resubmits
        self.init_options = init_options or {}
        self.runtime_env = runtime_env  # per task: what a worker on a fresh node needs (pip, env_vars, working_dir)
        self._started = False

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError:
            raise ImportError("--executor ray needs Ray: pip install 'actsparse[ray]' (or pip install ray)") from None
        if not ray.is_initialized():
            ray.init(address=self.address, **self.init_options)
            self._started = True
        return ray

    def map(
        self, fn: Callable[[Item, Any, Progress | None], Any], items: Sequence[Item], context: Any, progress: Progress
    ) -> Iterator[tuple[Item, Any]]:
        ray = self._ray()
        options: dict[str, Any] = dict(
            num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.max_retries, retry_exceptions=False
        )
        if self.runtime_env:
            options["runtime_env"] = self.runtime_env
        task = ray.remote(_call).options(**options)
        shared = [ray.put(context)]  # in a list, so that a worker fetches it only when it has no copy yet

        def submit(item: Item) -> Any:
            return task.remote(fn, item, shared)

        pending = {submit(item): (item, 0) for item in items}
        try:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                item, lost = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    raise err.as_instanceof_cause() from None
                except ray.exceptions.RayError as err:
                    if lost >= self.resubmits:
                        raise PointLostError(f"point {item} was lost {lost + 1} times; last: {err}") from None
                    pending[submit(item)] = (item, lost + 1)
                    continue
                yield item, result
        finally:
            for ref in pending:  # the driver stopped early: do not leave its points running
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)

    def close(self) -> None:
        """Shut Ray down if this executor started it."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


_CONTEXT: dict[str, Any] = {}
"""The shared context a Ray worker fetched last, by object id."""


def _call(fn: Callable[[Any, Any, Any], Any], item: Any, shared: list[Any]) -> Any:
    """Ray task body: fetch the shared context once per worker, then evaluate one item."""
    import ray

    ref = shared[0]
    if ref.hex() not in _CONTEXT:
        _CONTEXT.clear()
        _CONTEXT[ref.hex()] = ray.get(ref)
    return fn(item, _CONTEXT[ref.hex()], None)


def make_executor(
    name: str = "local",
    address: str | None = None,
    gpus_per_point: float = 0.0,
    cpus_per_point: float = 1.0,
    runtime_env: dict[str, Any] | None = None,
) -> LocalExecutor | RayExecutor:
    """The executor called `name` ('local' or 'ray'); Ray options are refused for the local one."""
    if name == "local":
        if address is not None or gpus_per_point or runtime_env:
            raise ValueError("--address, --gpus-per-point and --runtime-env need --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, gpus_per_point, cpus_per_point, runtime_env=runtime_env)
    raise ValueError(f"unknown executor {name!r}; choose from local, ray")


EXECUTORS = ("local", "ray")

__all__ = [
    "EXECUTORS",
    "Executor",
    "LocalExecutor",
    "PointContext",
    "PointLostError",
    "PointOutcome",
    "RayExecutor",
    "evaluate_point",
    "instrument",
    "make_executor",
]
