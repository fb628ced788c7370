"""WINA (microsoft/wina): choose the mask on s_i = |v_i|·‖column i of the matrix that consumes v‖₂.

For `input` the consuming matrix is W_g and W_u stacked (both read x), for `gate`, `up` and
`intermediate` it is W_d. The mask is top_k or top_p on s (ties kept, SPEC §2); kept entries keep
their original values. s is formed in float64, where the product of two float32 numbers is exact, so
the fast path and the reference agree bit for bit.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from actsparse.models.adapters import find_ffns
from actsparse.sparsity.rules import _reference_row, check_finite, top_k_mask, top_p_mask_sort

__all__ = ["column_norms", "reference_wina_mask", "wina_scores", "wina_top_k_mask", "wina_top_p_mask"]

WINA_BASE = {"wina_top_p": "top_p", "wina_top_k": "top_k"}
"""WINA rule → the rule it applies to the weighted scores."""

Norms = dict[int, dict[str, torch.Tensor]]
_NORMS: weakref.WeakKeyDictionary[nn.Module, Norms] = weakref.WeakKeyDictionary()


def column_norms(model: nn.Module) -> Norms:
    """layer → {vector: ‖column‖₂ of its consuming matrix}, computed once per model (cached)."""
    if model in _NORMS:
        return _NORMS[model]
    norms: Norms = {}
    for ffn in find_ffns(model):
        w = ffn.adapter.gated_weights(ffn.module)
        if w is None:
            raise ValueError(
                f"WINA needs the dense weights of layer {ffn.layer}'s FFN (packed experts are not supported)"
            )
        with torch.no_grad():
            x_norm = (w.gate.double().square().sum(0) + w.up.double().square().sum(0)).sqrt()
            d_norm = w.down.double().square().sum(0).sqrt()
        norms[ffn.layer] = {"input": x_norm.float(), "gate": d_norm.float(), "up": d_norm.float()}
        norms[ffn.layer]["intermediate"] = d_norm.float()
    _NORMS[model] = norms
    return norms


def wina_scores(v: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """s = |v|·norms in float64 (exact for float32 inputs)."""
    check_finite(v)
    if norms.shape != v.shape[-1:]:
        raise ValueError(f"WINA column norms have shape {tuple(norms.shape)}, the vector has {v.shape[-1]} entries")
    return v.detach().double().abs() * norms.to(v.device, torch.float64)


def wina_top_p_mask(v: torch.Tensor, p: float, norms: torch.Tensor) -> torch.Tensor:
    """Top-p keep-mask chosen on s = |v|·‖W_{:,i}‖₂."""
    return top_p_mask_sort(wina_scores(v, norms), p)


def wina_top_k_mask(v: torch.Tensor, f: float, norms: torch.Tensor) -> torch.Tensor:
    """Top-k keep-mask (fraction f kept) chosen on s = |v|·‖W_{:,i}‖₂."""
    return top_k_mask(wina_scores(v, norms), f)


def reference_wina_mask(v: torch.Tensor, rule: str, value: float, norms: torch.Tensor) -> torch.Tensor:
    """Row by row in Python float64: s_i = |v_i|·norm_i, then the base rule's reference on s."""
    values = v.detach().cpu().double()
    check_finite(values)
    weights = [float(x) for x in norms.double().tolist()]
    rows = values.reshape(-1, v.shape[-1]).tolist()
    keep = [
        _reference_row([abs(x) * w for x, w in zip(row, weights, strict=True)], WINA_BASE[rule], value) for row in rows
    ]
    return torch.tensor(keep, dtype=torch.bool).reshape(v.shape).to(v.device)
