"""TEAL-style calibration of the `threshold` rule: per layer and vector, τ = the S-quantile of |v|.

The dense model reads a calibration text kept apart from every evaluation task (by default chapters
1–4 of Jane Austen's *Persuasion*, public domain, shipped in `actsparse/data/`); the |activation|
of each targeted vector is collected over real tokens, and τ is chosen so that a fraction S of the
entries satisfies |v| ≤ τ, the entries that `threshold` zeroes. For `all_inputs` the intermediate
vector is calibrated in a second pass with the input thresholds applied, as it will be used. The
result is the JSON file that `SparsitySpec(target, "threshold", path)` loads.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from actsparse.models.adapters import FFN
from actsparse.sparsity.instrument import TokenContext, replaced_forwards, select_ffns
from actsparse.sparsity.rules import threshold
from actsparse.sparsity.spec import Thresholds, check_target, target_vectors

__all__ = [
    "CALIBRATION_TEXT",
    "calibrate",
    "calibration_batches",
    "calibration_text",
    "quantile_threshold",
    "save_thresholds",
]

CALIBRATION_TEXT = "calibration_persuasion.txt"
"""The built-in calibration text under `actsparse/data/`."""

MAX_VALUES = 1 << 24
"""Most |v| entries kept per (layer, vector); beyond it tokens are subsampled evenly."""


def calibration_text(path: str | Path | None = None) -> str:
    """The text of `path`, or the built-in calibration text."""
    if path is not None:
        return Path(path).read_text()
    return resources.files("actsparse").joinpath("data", CALIBRATION_TEXT).read_text()


def calibration_batches(
    tokenizer: Any, text: str, tokens: int = 4096, seq_len: int = 512, batch_size: int = 4
) -> Iterator[dict[str, torch.Tensor]]:
    """Model inputs covering the first `tokens` tokens of `text`, cut into sequences of `seq_len`."""
    ids = torch.as_tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:tokens], dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("the calibration text gives no tokens")
    full = ids.numel() // seq_len * seq_len
    chunks = list(ids[:full].reshape(-1, seq_len))
    for start in range(0, len(chunks), batch_size):
        batch = torch.stack(chunks[start : start + batch_size])
        yield {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
    if full < ids.numel():
        rest = ids[full:].unsqueeze(0)
        yield {"input_ids": rest, "attention_mask": torch.ones_like(rest)}


def quantile_threshold(values: torch.Tensor, sparsity: float) -> float:
    """The smallest τ among `values` (≥ 0) with at least a fraction `sparsity` of them ≤ τ (0 for S = 0)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    values = values.flatten().float()
    k = math.ceil(sparsity * values.numel())
    if k == 0:
        return 0.0
    return float(values.kthvalue(k).values)


class _Collector:
    """A site that keeps |v| of the vectors it collects over real tokens, and applies the
    thresholds already calibrated (`applied`: (layer, vector) → τ) to the others."""

    def __init__(
        self, layer: int, tokens: TokenContext, store: dict, applied: dict, collect: tuple[str, ...], stride: int
    ):
        self.layer, self.tokens, self.store, self.applied = layer, tokens, store, applied
        self.collect, self.stride = collect, stride

    def __call__(
        self, vector: str, v: torch.Tensor, expert: int | None = None, token_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        if vector in self.collect:
            rows = self.tokens.real_rows(v, token_index)
            self.store[(self.layer, vector)].append(rows[:: self.stride].abs().float().cpu())
        tau = self.applied.get((self.layer, vector))
        return v if tau is None else threshold(v, tau)


def calibrate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    target: str,
    sparsity: float,
    layers: list[int] | None = None,
    token_stride: int = 1,
) -> Thresholds:
    """Per-layer thresholds {layer: {vector: τ}} so that `target` reaches `sparsity` on `batches`.

    `token_stride` keeps every n-th token's activations only (memory, for big models).
    """
    check_target(target)
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    ffns = select_ffns(model, layers)
    batches = list(batches)
    applied: dict[tuple[int, str], float] = {}
    device = next(model.parameters()).device
    for vector in target_vectors(target):  # in forward order: `intermediate` sees the sparsified input
        store: dict[tuple[int, str], list[torch.Tensor]] = defaultdict(list)

        def make_forward(ffn: FFN, tokens: TokenContext, store=store, vector=vector):
            site = _Collector(ffn.layer, tokens, store, applied, (vector,), token_stride)
            return partial(ffn.adapter.forward, ffn.module, site)

        with torch.no_grad(), replaced_forwards(model, ffns, make_forward):
            for batch in batches:
                model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
        if not store:
            raise ValueError("the calibration batches reached no targeted activation")
        for (layer, name), parts in store.items():
            values = torch.cat([p.flatten() for p in parts])
            if values.numel() > MAX_VALUES:
                values = values[:: math.ceil(values.numel() / MAX_VALUES)]
            applied[(layer, name)] = quantile_threshold(values, sparsity)
    thresholds: Thresholds = defaultdict(dict)
    for (layer, name), tau in sorted(applied.items()):
        thresholds[layer][name] = tau
    return dict(thresholds)


def save_thresholds(path: str | Path, thresholds: Thresholds, model: str, target: str, sparsity: float) -> None:
    """Write the calibration file that `SparsitySpec(target, "threshold", path)` loads."""
    record = {
        "model": model,
        "target": target,
        "sparsity": sparsity,
        "thresholds": {str(layer): taus for layer, taus in sorted(thresholds.items())},
    }
    Path(path).write_text(json.dumps(record, indent=2) + "\n")
