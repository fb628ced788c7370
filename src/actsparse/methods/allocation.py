"""TEAL's greedy allocation of sparsity over layers, for the `threshold` rule.

TEAL spreads a model-level sparsity unevenly: layers whose FFN output suffers little from pruning get
more. Here each (layer, vector) the target covers is a unit; its block error at sparsity s is
‖FFN(x) − FFN_s(x)‖² / ‖FFN(x)‖² on calibration tokens, where FFN_s thresholds that vector at the
s-quantile of its |v| (dense inputs, each unit measured alone). Starting from zero, the greedy search
raises, step by step, the unit whose next step adds the least error, until the entry-weighted mean
sparsity reaches the target (the last step taken fractionally, so the target is met exactly). TEAL
searches within a block over its attention and MLP projections; with only FFN targets the search is
over layers (and over input and intermediate for `all_inputs`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from actsparse.sparsity.instrument import replaced_forwards, select_ffns
from actsparse.sparsity.spec import Thresholds, target_vectors

__all__ = ["ErrorCurves", "allocate", "error_curves", "greedy_thresholds"]

STEP = 0.05
"""Sparsity step of the greedy search (the error curves are measured on this grid)."""
TAU_GRID = 200
"""τ is tabulated at this many + 1 evenly spaced sparsities and interpolated in between."""
ERROR_TOKENS = 512
"""Calibration tokens on which each block's output error is measured."""


@dataclass
class ErrorCurves:
    """Per unit (layer, vector): entries per token, block error on the STEP grid, τ on the fine grid."""

    units: list[tuple[int, str]]
    entries: np.ndarray  # [U]
    errors: np.ndarray  # [U, L] relative output error at sparsity levels 0, STEP, ...
    taus: np.ndarray  # [U, TAU_GRID + 1] τ at sparsity k / TAU_GRID

    def to_dict(self) -> dict:
        return {
            "units": [[layer, vector] for layer, vector in self.units],
            "entries": self.entries.tolist(),
            "errors": self.errors.tolist(),
            "taus": self.taus.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ErrorCurves:
        units = [(int(layer), str(vector)) for layer, vector in d["units"]]
        return cls(units, np.array(d["entries"], float), np.array(d["errors"], float), np.array(d["taus"], float))


class _Capture:
    """A site that records the FFN input, or thresholds one vector (and records the output's inputs)."""

    def __init__(self, vector: str | None = None, tau: float | None = None):
        self.vector, self.tau = vector, tau
        self.seen: dict[str, torch.Tensor] = {}

    def __call__(self, vector: str, v: torch.Tensor, expert=None, token_index=None) -> torch.Tensor:
        self.seen[vector] = v
        if vector == self.vector and self.tau is not None:
            return torch.where(v.abs() > self.tau, v, torch.zeros((), dtype=v.dtype))
        return v


def _levels() -> np.ndarray:
    return np.round(np.arange(0.0, 1.0 - 1e-9, STEP), 6)


def error_curves(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], target: str) -> ErrorCurves:
    """Measure every unit's block error and τ table on the calibration batches (dense model)."""
    ffns = select_ffns(model, None)
    inputs: dict[int, list[torch.Tensor]] = {f.layer: [] for f in ffns}
    device = next(model.parameters()).device

    def make_forward(ffn, tokens):
        def forward(module, *args):
            x = args[0]
            real = tokens.rows(x, None)
            rows = (x if real is None else x[real]).detach().reshape(-1, x.shape[-1])
            inputs[ffn.layer].append(rows.float().cpu())
            return ffn.adapter.forward(module, _Capture(), *args)

        return partial(forward, ffn.module)

    with torch.no_grad(), replaced_forwards(model, ffns, make_forward):
        for batch in batches:
            model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    units, entries, errors, taus = [], [], [], []
    fine = np.linspace(0.0, 1.0, TAU_GRID + 1)
    with torch.no_grad():
        for ffn in ffns:
            x_all = torch.cat(inputs[ffn.layer])
            param = next(ffn.module.parameters())
            x_all = x_all.to(param.device, param.dtype)
            dense = _Capture()
            ffn.adapter.forward(ffn.module, dense, x_all)
            stride = max(1, x_all.shape[0] // ERROR_TOKENS)
            x = x_all[::stride][:ERROR_TOKENS]
            y = ffn.adapter.forward(ffn.module, _Capture(), x).float()
            norm = float(y.square().sum()) or 1.0
            for vector in target_vectors(target):
                a = dense.seen[vector].detach().abs().float().flatten()
                if a.numel() > 1 << 24:
                    a = a[:: -(-a.numel() // (1 << 24))]
                a_sorted = a.sort().values
                idx = np.clip(np.ceil(fine * a.numel()).astype(int) - 1, 0, a.numel() - 1)
                tau_row = np.where(fine > 0, a_sorted[torch.as_tensor(idx)].numpy(), 0.0)
                err_row = []
                for s in _levels():
                    tau = float(np.interp(s, fine, tau_row))
                    y_s = ffn.adapter.forward(ffn.module, _Capture(vector, tau if s > 0 else None), x).float()
                    err_row.append(float((y_s - y).square().sum()) / norm)
                units.append((ffn.layer, vector))
                entries.append(dense.seen[vector].shape[-1])
                errors.append(err_row)
                taus.append(tau_row)
    return ErrorCurves(units, np.array(entries, float), np.array(errors, float), np.array(taus, float))


def allocate(curves: ErrorCurves, sparsity: float) -> np.ndarray:
    """Per-unit sparsity whose entry-weighted mean is `sparsity`, by TEAL's greedy search."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    levels = _levels()
    top = len(levels) - 1
    weights = curves.entries / curves.entries.sum()
    state = np.zeros(len(curves.units), dtype=int)
    alloc = np.zeros(len(curves.units))
    reached = 0.0
    while reached < sparsity - 1e-12:
        open_units = np.flatnonzero(state < top)
        if len(open_units) == 0:  # every unit at the top level: go on uniformly to the target
            alloc = alloc + (sparsity - reached)
            break
        cost = curves.errors[open_units, state[open_units] + 1] - curves.errors[open_units, state[open_units]]
        best = open_units[int(np.argmin(cost))]
        gain = weights[best] * STEP
        if reached + gain >= sparsity:
            alloc[best] += (sparsity - reached) / weights[best]
            break
        state[best] += 1
        alloc[best] = levels[state[best]]
        reached += gain
    return np.clip(alloc, 0.0, 1.0)


def greedy_thresholds(curves: ErrorCurves, sparsity: float) -> Thresholds:
    """Thresholds {layer: {vector: τ}} of the greedy allocation at a model-level `sparsity`."""
    fine = np.linspace(0.0, 1.0, TAU_GRID + 1)
    out: Thresholds = {}
    for (layer, vector), s, tau_row in zip(curves.units, allocate(curves, sparsity), curves.taus, strict=True):
        out.setdefault(layer, {})[vector] = float(np.interp(s, fine, tau_row)) if s > 0 else 0.0
    return out
