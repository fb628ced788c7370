"""Where sparsity lives and what it costs, per task and per layer, at one fixed operating point.

- `record_tokens`: run a spec like `sparsify` and keep each real token's sparsity, per layer (the
  data behind the density of per-token sparsity per task, the paper's Figure 3b);
- `retention`: a task's sparse / dense score with a paired-bootstrap interval over documents; for a
  bits-per-byte task the contract ratio dense_bpb / sparse_bpb of the task's mean bpb;
- `layer_sensitivity`: sparsify one layer at a time and measure the loss in KL and in score.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from actsparse.analysis import LEVEL, RESAMPLES, mean_kl, paired_ratio
from actsparse.evaluate.results import DocResult, TaskResult
from actsparse.models.adapters import FFN
from actsparse.sparsity.instrument import RuleSite, TokenContext, instrumented
from actsparse.sparsity.spec import SparsitySpec
from actsparse.sparsity.stats import SparsityStats


class TokenSparsity:
    """Per (layer, vector): the zero fraction of each real token's vector, in the order forwards ran."""

    def __init__(self) -> None:
        self.zeros: dict[tuple[int, str], list[torch.Tensor]] = defaultdict(list)
        self.sizes: dict[tuple[int, str], int] = {}

    def record(self, layer: int, vector: str, out: torch.Tensor, real: torch.Tensor | None) -> None:
        zero = (out == 0).sum(-1)
        zero = zero[real] if real is not None else zero.reshape(-1)
        self.zeros[(layer, vector)].append(zero.to(torch.int32).cpu())
        self.sizes[(layer, vector)] = out.shape[-1]

    def per_layer(self) -> dict[int, np.ndarray]:
        """layer → [tokens] fraction of entries zero after the rule (vectors of a layer pooled)."""
        by_layer: dict[int, list[tuple[np.ndarray, int]]] = defaultdict(list)
        for (layer, vector), parts in self.zeros.items():
            by_layer[layer].append((torch.cat(parts).numpy(), self.sizes[(layer, vector)]))
        out = {}
        for layer, items in sorted(by_layer.items()):
            out[layer] = np.sum([z.astype(np.float64) for z, _ in items], axis=0) / sum(n for _, n in items)
        return out

    def per_token(self) -> np.ndarray:
        """[tokens] sparsity of each real token, entry-weighted over every layer and vector."""
        if not self.zeros:
            return np.zeros(0)
        lengths = {len(torch.cat(p)) for p in self.zeros.values()}
        if len(lengths) != 1:
            raise ValueError("layers saw different tokens (routed experts?): per-token sparsity needs dense FFNs")
        zeros = sum(torch.cat(p).numpy().astype(np.float64) for p in self.zeros.values())
        return np.asarray(zeros) / sum(self.sizes.values())


class _TokenSite(RuleSite):
    """A RuleSite that also keeps each real token's zero fraction (dense FFNs; experts are skipped)."""

    def __init__(self, spec: SparsitySpec, layer: int, tokens: TokenContext, stats: SparsityStats, sink: TokenSparsity):
        super().__init__(spec, layer, tokens, stats)
        self.sink = sink

    def __call__(
        self, vector: str, v: torch.Tensor, expert: int | None = None, token_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = super().__call__(vector, v, expert, token_index)
        if vector in self.spec.vectors and expert is None:
            self.sink.record(self.layer, vector, out, self.tokens.rows(v, token_index))
        return out


@contextmanager
def record_tokens(
    model: nn.Module, spec: SparsitySpec, layers: list[int] | None = None
) -> Iterator[tuple[SparsityStats, TokenSparsity]]:
    """`sparsify(model, spec, layers)` that also records per-token sparsity; yields (stats, tokens)."""
    sink = TokenSparsity()

    def make_forward(ffn: FFN, tokens: TokenContext, stats: SparsityStats) -> Callable[..., torch.Tensor]:
        return partial(ffn.adapter.forward, ffn.module, _TokenSite(spec, ffn.layer, tokens, stats, sink))

    with instrumented(model, spec, layers, make_forward) as stats:
        yield stats, sink


def is_bpb(result: TaskResult) -> bool:
    """Whether a task is scored by bits per byte (its documents carry metrics['bpb'])."""
    return bool(result.docs) and all("bpb" in d.metrics for d in result.docs)


@dataclass
class Retention:
    """sparse / dense on one task (bpb: dense_bpb / sparse_bpb), with its paired-bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    measure: str  # 'score' or 'bpb'
    dense: float  # the dense task mean of the measure
    sparse: float
    kl: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def paired_values(dense: TaskResult, sparse: TaskResult) -> tuple[np.ndarray, np.ndarray, str]:
    """Dense [n] and sparse [n] per-document measures on the documents both have, and the measure."""
    measure = "bpb" if is_bpb(dense) and is_bpb(sparse) else "score"
    ids = sorted({d.doc_id for d in dense.docs} & {d.doc_id for d in sparse.docs})

    def values(result: TaskResult) -> np.ndarray:
        by_id: dict[int, DocResult] = {d.doc_id: d for d in result.docs}
        return np.array([by_id[i].metrics["bpb"] if measure == "bpb" else by_id[i].score for i in ids], dtype=float)

    return values(dense), values(sparse), measure


def retention(
    dense: TaskResult, sparse: TaskResult, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> Retention:
    """Retention of one task at one point: the same bootstrap draw of documents for dense and sparse."""
    d, s, measure = paired_values(dense, sparse)
    if len(d) == 0:
        raise ValueError(f"task {dense.task!r}: the dense and sparse runs share no document")
    num, den = (d, s) if measure == "bpb" else (s, d)
    value, (lo, hi), _ = paired_ratio(num, den, resamples, seed, level)
    return Retention(value, lo, hi, len(d), measure, float(d.mean()), float(s.mean()), mean_kl(sparse.docs))


@dataclass
class LayerLoss:
    """Sparsifying one layer alone: its sparsity, the mean KL to dense and the retention per task."""

    layer: int
    sparsity: float
    kl: dict[str, float | None]
    retention: dict[str, Retention]

    @property
    def loss(self) -> float:
        """1 − mean retention over tasks (the loss in normalised performance)."""
        values = [r.value for r in self.retention.values() if not math.isnan(r.value)]
        return 1.0 - float(np.mean(values)) if values else math.nan


def layer_sensitivity(
    model: nn.Module,
    layers: Sequence[int],
    spec: SparsitySpec,
    evaluate: Callable[[], dict[str, TaskResult]],
    dense: dict[str, TaskResult],
    resamples: int = RESAMPLES,
    seed: int = 0,
    done: Callable[[LayerLoss], None] | None = None,
) -> list[LayerLoss]:
    """Sparsify each of `layers` alone with `spec`; `evaluate()` scores every task against its dense
    reference (KL) and returns task → TaskResult; `dense` holds the dense results to compare with."""
    from actsparse.sparsity.instrument import sparsify

    out = []
    for layer in layers:
        with torch.no_grad(), sparsify(model, spec, layers=[layer]) as stats:
            results = evaluate()
        sparsity = float(stats.to_dict().get("all", {}).get("sparsity", math.nan))
        loss = LayerLoss(
            layer,
            sparsity,
            {t: mean_kl(r.docs) for t, r in results.items()},
            {t: retention(dense[t], r, resamples, seed) for t, r in results.items()},
        )
        out.append(loss)
        if done is not None:
            done(loss)
    return out
