"""Evaluate a model on a task: per-document results, and KL to a dense reference (SPEC §4).

`evaluate_task` is the one entry point: causal LMs go to the causal scorer (`scorer.py`, with its packed
and cached paths), diffusion LLMs to the diffusion scorer (`actsparse.diffusion.scoring`). Both build on
this package's shared pieces: `encode`, `metrics`, `kl`, `reference`, `results`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from actsparse._lazy import lazy_attributes
from actsparse.evaluate.results import DocResult, TaskResult

if TYPE_CHECKING:
    from torch import nn

    from actsparse.diffusion.options import DiffusionOptions
    from actsparse.evaluate.reference import DenseReference
    from actsparse.tasks import Task

__all__ = ["DenseReference", "DocResult", "TaskResult", "evaluate_task"]

# torch loads with the first use of DenseReference or evaluate_task, not with this package
__getattr__, __dir__ = lazy_attributes(__name__, {"DenseReference": "actsparse.evaluate.reference"})


def evaluate_task(
    model: nn.Module,
    tokenizer,
    task: str | Task,
    doc_ids: Sequence[int] | None = None,
    *,
    reference: DenseReference | None = None,
    batch_size: int | None = None,
    batch_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
    packing: bool = True,
    diffusion: DiffusionOptions | None = None,
) -> tuple[TaskResult, DenseReference]:
    """Score `doc_ids` of `task` (all when None). Dense run: returns the reference to keep; sparse
    run (pass the dense reference): every DocResult.kl is the mean KL(dense ‖ this run).

    Diffusion LLMs (LLaDA, diffusion_gemma: Monte-Carlo masked likelihood, iterative unmasking) take
    `diffusion` (`DiffusionOptions`, default its defaults) and `batch_size` (default 16); causal LMs
    take `batch_size`, `batch_tokens` and `packing` (`scorer.evaluate_causal_task`).
    """
    # imported here: the diffusion scorer builds on this package's modules, so this package cannot
    # import it while it is itself being imported (and torch loads with the first evaluation)
    from actsparse.diffusion import evaluate_diffusion_task, is_diffusion_model
    from actsparse.evaluate.scorer import evaluate_causal_task

    if is_diffusion_model(model):
        return evaluate_diffusion_task(
            model,
            tokenizer,
            task,
            doc_ids,
            reference=reference,
            batch_size=batch_size or 16,
            progress=progress,
            options=diffusion,
        )
    return evaluate_causal_task(
        model,
        tokenizer,
        task,
        doc_ids,
        reference=reference,
        batch_size=batch_size,
        batch_tokens=batch_tokens,
        progress=progress,
        packing=packing,
    )
