"""Sparsity accounting (SPEC §3): zeroed / seen entries over real tokens, per layer, vector,
phase and expert. Counts stay on the device as tensors and are read only when asked for."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

PHASES = ("prefill", "decode")

Key = tuple[int, str, str, int | None]
"""(layer, vector, phase, expert) — expert is None for a dense FFN."""


class SparsityStats:
    """Accumulated counts of one instrumentation. `vectors` are those its spec sparsifies."""

    def __init__(self, vectors: tuple[str, ...]):
        self.vectors = vectors
        self._counts: dict[Key, torch.Tensor] = {}

    def record(self, key: Key, counts: torch.Tensor) -> None:
        """Add a [zeroed, natural_zeros, seen] count vector for `key`."""
        if key in self._counts:
            self._counts[key] += counts
        else:
            self._counts[key] = counts.clone()

    def reset(self) -> None:
        self._counts.clear()

    def counts(self) -> dict[Key, tuple[int, int, int]]:
        """All counts as Python ints: key → (zeroed, natural_zeros, seen)."""
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
        return out
