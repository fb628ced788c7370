"""Sparsity accounting (SPEC §3): zeroed / seen entries over real tokens, per layer, vector,
phase and expert. Counts stay on the device as tensors and are read only when asked for."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

PHASES = ("prefill", "decode")

Key = tuple[int, str, str, int | None]
"""(layer, vector, phase, expert) — expert is None for a dense FFN."""


class StepStats:
    """Per denoising step (diffusion models): sparsity per layer, and how stable keep-masks are.

    Stability is the Jaccard index of each step's keep-mask with the previous step's and with the
    first step's, computed online from intersection and union counts: only the previous and first
    masks of each (layer, vector) are held, and `new_trajectory()` drops them. Dense FFNs only for
    Jaccard (routed experts see different tokens at each step); sparsity counts every FFN.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[int, int], torch.Tensor] = {}  # (step, layer) → [zeroed, seen]
        self._jaccard: dict[tuple[int, int], torch.Tensor] = {}  # → [∩prev, ∪prev, ∩first, ∪first]
        self._prev: dict[tuple[int, str], torch.Tensor] = {}
        self._first: dict[tuple[int, str], torch.Tensor] = {}

    def new_trajectory(self) -> None:
        """Forget the held masks: the next step starts a new denoising trajectory."""
        self._prev.clear()
        self._first.clear()

    def record(self, step: int, layer: int, vector: str, keep: torch.Tensor, expert: int | None) -> None:
        """Count one keep-mask [..., n] (real tokens only) at `step`."""
        with torch.no_grad():
            counts = torch.stack([(~keep).sum(), torch.tensor(keep.numel(), device=keep.device)])
            _add(self._counts, (step, layer), counts)
            if expert is not None:
                return
            key = (layer, vector)
            prev, first = self._prev.get(key), self._first.get(key)
            if prev is None or prev.shape != keep.shape:
                self._first[key] = keep
            elif first is not None:
                values = [*_overlap(keep, prev), *_overlap(keep, first)]
                _add(self._jaccard, (step, layer), torch.stack(values))
            self._prev[key] = keep

    def reset(self) -> None:
        self._counts.clear()
        self._jaccard.clear()
        self.new_trajectory()

    def sparsity(self, per_layer: bool = False) -> dict[int, Any]:
        """step → sparsity (pooled over layers), or step → {layer: sparsity}."""
        return _ratios(self._counts, 0, 1, per_layer)

    def jaccard(self, against: str = "previous", per_layer: bool = False) -> dict[int, Any]:
        """step → Jaccard of its keep-masks with the `previous` or `first` step's (pooled ∩ / pooled ∪)."""
        if against not in ("previous", "first"):
            raise ValueError(f"against must be 'previous' or 'first', got {against!r}")
        at = 0 if against == "previous" else 2
        return _ratios(self._jaccard, at, at + 1, per_layer)

    def to_dict(self) -> dict[str, Any]:
        def keyed(d: dict[int, Any]) -> dict[str, Any]:
            return {str(k): keyed(v) if isinstance(v, dict) else v for k, v in d.items()}

        return {
            "sparsity": keyed(self.sparsity()),
            "per_layer": keyed(self.sparsity(per_layer=True)),
            "jaccard_prev": keyed(self.jaccard("previous")),
            "jaccard_first": keyed(self.jaccard("first")),
            "jaccard_prev_per_layer": keyed(self.jaccard("previous", per_layer=True)),
            "jaccard_first_per_layer": keyed(self.jaccard("first", per_layer=True)),
        }

    def __bool__(self) -> bool:
        return bool(self._counts)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (a & b).sum(), (a | b).sum()


def _add(store: dict, key: Any, counts: torch.Tensor) -> None:
    if key in store:
        store[key] += counts
    else:
        store[key] = counts.clone()


def _ratios(store: dict[tuple[int, int], torch.Tensor], num: int, den: int, per_layer: bool) -> dict[int, Any]:
    if not store:
        return {}
    keys = sorted(store)
    values = torch.stack([store[k].cpu() for k in keys]).tolist()
    pooled: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    layers: dict[int, dict[int, float]] = defaultdict(dict)
    for (step, layer), v in zip(keys, values, strict=True):
        pooled[step][0] += int(v[num])
        pooled[step][1] += int(v[den])
        if v[den]:
            layers[step][layer] = v[num] / v[den]
    if per_layer:
        return dict(layers)
    return {step: n / d for step, (n, d) in pooled.items() if d}


class TokenCounts:
    """[zeroed, seen] per token of the forwards run while a scorer holds it, summed over layers and
    vectors: the scorer adds up each document's tokens (per-document sparsity, for the bootstrap).

    Every count `SparsityStats.record` receives meanwhile is also totalled, so `table()` returns None
    (not a wrong split) when some path counted entries without telling which tokens they came from."""

    def __init__(self) -> None:
        self._rows: torch.Tensor | None = None  # [N, 2] int64 over the forward's flattened tokens
        self._expected: torch.Tensor | None = None  # [zeroed, seen] of every record
        self._valid = True

    def expect(self, counts: torch.Tensor) -> None:
        total = counts[[0, 2]].to(torch.int64)
        self._expected = total if self._expected is None else self._expected + total

    def add(
        self, keep: torch.Tensor, real: torch.Tensor | None, token_index: torch.Tensor | None, tokens: int | None
    ) -> None:
        """Count one keep-mask [..., n]: its rows are the forward's tokens, or `token_index` of its `tokens`."""
        with torch.no_grad():
            n = keep.shape[-1]
            zeroed = (n - keep.sum(dim=-1)).reshape(-1).to(torch.int64)
            seen = torch.full_like(zeroed, n)
            if real is not None:
                zeroed, seen = zeroed * real.reshape(-1), seen * real.reshape(-1)
            rows = torch.stack([zeroed, seen], dim=-1)
            if token_index is not None:
                if tokens is None:
                    self._valid = False
                    return
                rows = torch.zeros((tokens, 2), dtype=torch.int64, device=keep.device).index_add_(
                    0, token_index.reshape(-1), rows
                )
            if self._rows is None:
                self._rows = rows.clone()
            elif self._rows.shape == rows.shape:
                self._rows += rows.to(self._rows.device)
            else:
                self._valid = False

    def table(self) -> torch.Tensor | None:
        """[N, 2] per-token (zeroed, seen) on the CPU; None when nothing or not everything was attributed."""
        if not self._valid or self._rows is None or self._expected is None:
            return None
        rows = self._rows.cpu()
        return rows if rows.sum(0).tolist() == self._expected.cpu().tolist() else None


class SparsityStats:
    """Accumulated counts of one instrumentation. `vectors` are those its spec sparsifies.

    While `step` is set (by a diffusion scorer), each keep-mask is also counted in `steps`.
    Counts may also be held elsewhere and brought in only when read (`defer`): a compiled kernel keeps
    running totals, so that a decode step pays no bookkeeping per layer.
    """

    def __init__(self, vectors: tuple[str, ...]):
        self.vectors = vectors
        self._counts: dict[Key, torch.Tensor] = {}
        self._deferred: list[Callable[[], dict[Key, torch.Tensor]]] = []
        self.step: int | None = None
        self.steps = StepStats()
        self.per_token: TokenCounts | None = None  # set by a scorer that counts per document

    def record(self, key: Key, counts: torch.Tensor) -> None:
        """Add a [zeroed, natural_zeros, seen] count vector for `key`."""
        if self.per_token is not None:
            self.per_token.expect(counts)
        self._add(key, counts)

    def _add(self, key: Key, counts: torch.Tensor) -> None:
        if key in self._counts:
            self._counts[key] += counts
        else:
            self._counts[key] = counts.clone()

    def defer(self, take: Callable[[], dict[Key, torch.Tensor]]) -> None:
        """Register `take`, which returns the counts held elsewhere since its last call (and forgets them);
        every read of the counts (and `snapshot`, `restore`, `reset`) calls it first. For counts made
        while `per_token` is None only: they bypass its per-document check. Register each source once."""
        self._deferred.append(take)

    def _gather(self) -> None:
        for take in self._deferred:
            for key, counts in take().items():
                self._add(key, counts)

    def reset(self) -> None:
        self._gather()
        self._counts.clear()
        self.steps.reset()

    def snapshot(self) -> dict[Key, torch.Tensor]:
        """A copy of the counts, to `restore` when a forward fails half-way (out-of-memory, retried)."""
        self._gather()
        return {k: v.clone() for k, v in self._counts.items()}

    def restore(self, snapshot: dict[Key, torch.Tensor]) -> None:
        self._gather()  # what was held elsewhere belongs to the failed forward too
        self._counts = {k: v.clone() for k, v in snapshot.items()}

    def counts(self) -> dict[Key, tuple[int, int, int]]:
        """All counts as Python ints: key → (zeroed, natural_zeros, seen)."""
        self._gather()
        if not self._counts:
            return {}
        keys = list(self._counts)
        values = torch.stack([self._counts[k].cpu() for k in keys]).tolist()
        return {k: (int(v[0]), int(v[1]), int(v[2])) for k, v in zip(keys, values, strict=True)}

    def _pooled(self, phase: str, vector: str | None, by: int | None, column: int = 0) -> dict[Any, float]:
        if phase not in ("all", *PHASES):
            raise ValueError(f"phase must be 'all', 'prefill' or 'decode', got {phase!r}")
        if vector is not None and vector not in self.vectors:
            raise ValueError(f"vector {vector!r} is not sparsified here; have {', '.join(self.vectors)}")
        num: dict[Any, int] = defaultdict(int)
        den: dict[Any, int] = defaultdict(int)
        for key, c in self.counts().items():
            if (phase != "all" and key[2] != phase) or (vector is not None and key[1] != vector):
                continue
            group = None if by is None else key[by]
            num[group] += c[column]
            den[group] += c[2]
        return {g: num[g] / den[g] for g in sorted(den, key=lambda g: (g is None, g)) if den[g]}

    def overall(self, phase: str = "all", vector: str | None = None) -> float:
        """Model-level sparsity: zeroed / seen pooled over layers (and the spec's vectors)."""
        return self._pooled(phase, vector, None).get(None, float("nan"))

    def per_layer(self, phase: str = "all", vector: str | None = None) -> dict[int, float]:
        """Sparsity of each layer, pooled over its vectors and experts."""
        return self._pooled(phase, vector, 0)

    def per_vector(self, phase: str = "all") -> dict[str, float]:
        """Sparsity of each sparsified vector (for `all_inputs`: input and intermediate apart)."""
        return self._pooled(phase, None, 1)

    def per_expert(self, layer: int, phase: str = "all") -> dict[int, float]:
        """Sparsity of each expert of an MoE layer (empty for a dense layer)."""
        num: dict[int, int] = defaultdict(int)
        den: dict[int, int] = defaultdict(int)
        for (lay, _, ph, expert), c in self.counts().items():
            if lay == layer and expert is not None and phase in ("all", ph):
                num[expert] += c[0]
                den[expert] += c[2]
        return {e: num[e] / den[e] for e in sorted(den) if den[e]}

    def natural_zeros(self, phase: str = "all", vector: str | None = None) -> float:
        """Fraction of entries that were exactly zero before the rule."""
        return self._pooled(phase, vector, None, column=1).get(None, float("nan"))

    def tokens_seen(self, phase: str = "all") -> int:
        """Entries seen, pooled (a size check for tests and reports)."""
        return sum(c[2] for k, c in self.counts().items() if phase in ("all", k[2]))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: overall, per phase, per layer, per vector, natural zeros."""
        out: dict[str, Any] = {"vectors": list(self.vectors)}
        for phase in ("all", *PHASES):
            overall = self.overall(phase)
            if overall == overall:  # skip phases with no tokens
                out[phase] = {
                    "sparsity": overall,
                    "natural_zeros": self.natural_zeros(phase),
                    "per_layer": {str(k): v for k, v in self.per_layer(phase).items()},
                    "per_vector": self.per_vector(phase),
                }
        if self.steps:
            out["steps"] = self.steps.to_dict()
        return out
