"""The paired KL's bookkeeping, for every scorer: a dense run keeps its top-k next-token log-probs at each
scored position (`DenseReference`), a sparse run reads its own log-probs at those ids, and a document's KL
is the mean of `metrics.topk_kl` over its positions."""

from __future__ import annotations

import torch

from actsparse.evaluate.metrics import topk_kl
from actsparse.evaluate.reference import DenseReference

TOPK = 32
"""Dense log-probs kept per scored position for KL (the rest of the vocabulary is one bucket)."""


def top_k(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense run's summary of log-probs [P, V]: the top-k ids (int32) and log-probs, [P, k] each, on CPU."""
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return ids.to(torch.int32).cpu(), values.cpu()


def at_ids(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A sparse run's read of log-probs [P, V] at the reference's ids [P, k]: [P, k] on CPU."""
    return logp.gather(-1, ids.to(logp.device).long()).cpu()


def kept_or_kl(
    ids: torch.Tensor, logp: torch.Tensor, doc_id: int, reference: DenseReference | None
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, float | None, int]:
    """A document's reads [P, k]: dense, the (ids, logp) to keep; sparse, the mean KL to the reference.
    Also the position count."""
    if reference is None:
        return (ids, logp), None, ids.shape[0]
    return None, float(topk_kl(reference.topk[doc_id][1], logp).mean()), ids.shape[0]
