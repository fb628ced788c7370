"""What an evaluation returns: per-document results, so that every comparison can be paired.

This is the contract between the scorer (`actsparse.evaluate`) and the sweep, analysis and report
(`actsparse.study.sweep`, `actsparse.analysis`, `actsparse.report`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SPARSITY_ZEROED = "sparsity_zeroed"
SPARSITY_SEEN = "sparsity_seen"
"""DocResult.metrics keys of a sparse document's own counts (entries zeroed, entries seen over its real
tokens, every layer): the bootstrap resamples achieved sparsity with the documents."""


@dataclass
class DocResult:
    """One document's outcome at one sweep point."""

    doc_id: int  # index of the document in the task's split (stable across points)
    score: float  # the task's main metric for this document, in [0, 1] (bpb tasks: 1/bpb, bytes per bit)
    metrics: dict[str, float] = field(default_factory=dict)  # every metric: acc, acc_norm, exact_match…
    answer: str = ""  # the chosen answer (choice index as text, or generated text): agreement
    kl: float | None = None  # mean KL(dense ‖ this point) over the scored tokens; None for dense
    tokens: int = 0  # scored tokens behind `kl`


@dataclass
class TaskResult:
    """One task at one sweep point."""

    task: str
    split: str  # the split actually used (offline: validation)
    metric: str  # name of the main metric behind DocResult.score
    docs: list[DocResult]
    sparsity: dict[str, Any] = field(default_factory=dict)  # SparsityStats.to_dict() of this run

    @property
    def score(self) -> float:
        return sum(d.score for d in self.docs) / len(self.docs) if self.docs else float("nan")
