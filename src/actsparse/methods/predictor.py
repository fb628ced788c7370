"""A predictor baseline in the style of Deja Vu: per layer a low-rank map x → logits over the d
intermediate entries, trained on calibration text to guess which entries top-p (value p) keeps.

Fitted in closed form (reduced-rank ridge regression of the ±1 keep targets), so that it takes seconds
per layer on a CPU rather than a training loop. Used as the rule `predictor` (target `intermediate`,
`gate` or `up`): the entries predicted kept (logit > 0) are kept, the rest zeroed, so an engine could
skip rows of W_g, W_u and columns of W_d before computing them. Its recall and precision are measured
on held-out calibration tokens (the last quarter), and its cost per token is counted: 2·r·(h + d)
FLOPs against the FFN's 6·h·d.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from actsparse.sparsity.instrument import replaced_forwards, select_ffns
from actsparse.sparsity.rules import top_p_mask

__all__ = ["LowRankPredictor", "PredictorMetrics", "cached_predictors", "predictor_flops", "train_predictors"]

RIDGE = 1e-3
"""Ridge λ as a fraction of the mean diagonal of XᵀX."""
HELD_OUT = 0.25


def predictor_flops(h: int, d: int, rank: int) -> int:
    """Multiply-adds × 2 of one token through the predictor."""
    return 2 * rank * (h + d)


def ffn_flops(h: int, d: int) -> int:
    """FLOPs of one token through a dense gated FFN (three h × d matrices)."""
    return 6 * h * d


class LowRankPredictor(nn.Module):
    """logits = B(A x) + b, with A: h → r and B: r → d."""

    def __init__(self, h: int, d: int, rank: int):
        super().__init__()
        self.a = nn.Linear(h, rank, bias=False)
        self.b = nn.Linear(rank, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))

    def predict_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Keep-mask of the intermediate entries predicted kept (logit > 0)."""
        with torch.no_grad():
            return self(x.to(self.a.weight.dtype)) > 0


@dataclass
class PredictorMetrics:
    """Held-out quality of one layer's predictor against the rule it imitates."""

    recall: float  # kept by the rule and predicted kept / kept by the rule
    precision: float  # kept by the rule and predicted kept / predicted kept
    rule_sparsity: float
    predicted_sparsity: float


def _collect(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], vector: str
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """layer → (x [N, h], v [N, d]) of the dense model on the batches' real tokens."""
    ffns = select_ffns(model, None)
    xs: dict[int, list[torch.Tensor]] = {f.layer: [] for f in ffns}
    vs: dict[int, list[torch.Tensor]] = {f.layer: [] for f in ffns}
    device = next(model.parameters()).device

    def make_forward(ffn, tokens):
        def site(name, v, expert=None, token_index=None):
            if name in ("input", vector):
                (xs if name == "input" else vs)[ffn.layer].append(tokens.real_rows(v, token_index).float().cpu())
            return v

        return partial(ffn.adapter.forward, ffn.module, site)

    with torch.no_grad(), replaced_forwards(model, ffns, make_forward):
        for batch in batches:
            model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    return {layer: (torch.cat(xs[layer]), torch.cat(vs[layer])) for layer in xs}


def fit_low_rank(x: torch.Tensor, keep: torch.Tensor, rank: int, ridge: float = RIDGE) -> LowRankPredictor:
    """Reduced-rank ridge regression of ±1 keep targets on standardised x, in closed form.

    W = (XᵀX + λI)⁻¹ XᵀY fits every entry; the fitted values X W are projected on their top `rank`
    right singular vectors V (those of Lᵀ W, with L Lᵀ = XᵀX + λI), so that A = (W V)ᵀ and B = V.
    """
    x = x.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xn = (x - mean) / std
    y = keep.float() * 2 - 1
    y_mean = y.mean(0)
    gram = (xn.T @ xn).double()
    gram += ridge * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=gram.dtype)
    chol = torch.linalg.cholesky(gram)
    w = torch.cholesky_solve((xn.T @ (y - y_mean)).double(), chol)  # [h, d]
    rank = min(rank, w.shape[0], w.shape[1])
    v = torch.linalg.svd(chol.T @ w, full_matrices=False).Vh[:rank].T  # [d, r]
    a = (w @ v).T / std.double()  # [r, h], the standardisation folded in
    predictor = LowRankPredictor(x.shape[1], keep.shape[1], rank)
    with torch.no_grad():
        predictor.a.weight.copy_(a)
        predictor.b.weight.copy_(v)
        predictor.b.bias.copy_(y_mean.double() - v @ (a @ mean.double()))
    return predictor.requires_grad_(False)


def train_predictors(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], target: str, p: float, rank: int
) -> tuple[dict[int, LowRankPredictor], dict[int, PredictorMetrics]]:
    """Fit one predictor per layer on the first 3/4 of the tokens; measure it on the last 1/4."""
    if target not in ("gate", "up", "intermediate"):
        raise ValueError(f"the predictor guesses a d-dimensional mask: target gate, up or intermediate, not {target!r}")
    data = _collect(model, batches, target)
    predictors, metrics = {}, {}
    for layer, (x, v) in data.items():
        keep = top_p_mask(v, p)
        n_train = int(x.shape[0] * (1 - HELD_OUT))
        predictor = fit_low_rank(x[:n_train], keep[:n_train], rank)
        predicted = predictor.predict_mask(x[n_train:])
        truth = keep[n_train:]
        hit = float((predicted & truth).sum())
        metrics[layer] = PredictorMetrics(
            recall=hit / max(1.0, float(truth.sum())),
            precision=hit / max(1.0, float(predicted.sum())),
            rule_sparsity=1 - float(truth.float().mean()),
            predicted_sparsity=1 - float(predicted.float().mean()),
        )
        predictors[layer] = predictor
    return predictors, metrics


def cached_predictors(
    model: nn.Module, tokenizer: Any, target: str, p: float, options: Any
) -> dict[int, LowRankPredictor]:
    """Trained predictors for (model, target, p, rank, text), from RUN_DIR/calibration/ when there."""
    from actsparse.methods.thresholds import cache_file, model_id
    from actsparse.speed.calibrate import calibration_batches

    key = (model_id(model), target, float(p), f"r{options.predictor_rank}", options.text_id())
    path = None if options.run_dir is None else cache_file(options.run_dir, "predictor", *key)
    weights = None if path is None else path.with_suffix(".pt")
    param = next(model.parameters())
    if weights is not None and weights.exists():
        states = torch.load(weights, weights_only=True)
        out = {}
        for layer, state in states.items():
            predictor = LowRankPredictor(state["a.weight"].shape[1], state["b.weight"].shape[0], options.predictor_rank)
            predictor.load_state_dict(state)
            out[int(layer)] = predictor.requires_grad_(False).to(param.device)
        return out
    batches = list(calibration_batches(tokenizer, options.text(), options.calibration_tokens))
    predictors, metrics = train_predictors(model, batches, target, p, options.predictor_rank)
    if path is not None and weights is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({layer: pr.state_dict() for layer, pr in predictors.items()}, weights)
        some = next(iter(predictors.values()))
        h, d = some.a.weight.shape[1], some.b.weight.shape[0]
        record = {
            "target": target,
            "p": float(p),
            "rank": options.predictor_rank,
            "text": options.text_id(),
            "held_out": HELD_OUT,
            "flops_per_token": {"predictor": predictor_flops(h, d, options.predictor_rank), "ffn": ffn_flops(h, d)},
            "recall": sum(m.recall for m in metrics.values()) / len(metrics),
            "precision": sum(m.precision for m in metrics.values()) / len(metrics),
            "per_layer": {str(layer): vars(m) for layer, m in sorted(metrics.items())},
        }
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
    return {layer: pr.to(param.device) for layer, pr in predictors.items()}
