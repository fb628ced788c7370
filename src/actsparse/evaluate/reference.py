"""`DenseReference`: what a sparse run needs from the dense run to measure KL(dense ‖ sparse)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class DenseReference:
    """The dense model's top-k next-token log-probs at every scored position, per document.

    `generated` keeps the dense greedy generations (generate tasks): a sparse run is teacher-forced on
    them, so that both distributions are compared at the same positions.
    """

    task: str
    k: int
    topk: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # doc → (ids, logp) [P, k]
    generated: dict[int, list[int]] = field(default_factory=dict)

    def check(self, task: str, doc_ids: Sequence[int]) -> None:
        """ValueError unless this is the reference of `task` and holds every one of `doc_ids`."""
        if self.task != task:
            raise ValueError(f"the dense reference is for task {self.task!r}, not {task!r}")
        missing = sorted(set(doc_ids) - set(self.topk))
        if missing:
            raise ValueError(f"the dense reference lacks documents {missing[:5]}{'…' if len(missing) > 5 else ''}")

    def check_positions(self, doc_id: int, positions: int) -> None:
        """ValueError unless the reference has as many scored positions for `doc_id` as this run reads."""
        have = self.topk[doc_id][0].shape[0]
        if have != positions:
            raise ValueError(
                f"document {doc_id}: {positions} scored positions, the reference has {have} "
                "(another tokenizer or task version?)"
            )

    def save(self, path: str | Path) -> None:
        docs = sorted(self.topk)
        sizes = torch.tensor([self.topk[d][0].shape[0] for d in docs], dtype=torch.int64)
        empty = (torch.zeros(0, self.k, dtype=torch.int32), torch.zeros(0, self.k))
        data = {
            "task": self.task,
            "k": self.k,
            "docs": torch.tensor(docs, dtype=torch.int64),
            "sizes": sizes,
            "ids": torch.cat([self.topk[d][0] for d in docs]) if docs else empty[0],
            "logp": torch.cat([self.topk[d][1] for d in docs]) if docs else empty[1],
            "generated": {str(d): list(g) for d, g in self.generated.items()},
        }
        torch.save(data, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> DenseReference:
        data = torch.load(Path(path), weights_only=True)
        docs, sizes = data["docs"].tolist(), data["sizes"].tolist()
        ids, logp = data["ids"].split(sizes), data["logp"].split(sizes)
        return cls(
            task=data["task"],
            k=int(data["k"]),
            topk={d: (i, p) for d, i, p in zip(docs, ids, logp, strict=True)},
            generated={int(d): list(g) for d, g in data["generated"].items()},
        )
