"""The field's other training-free methods, run through the same instrumentation as the rules.

- `threshold` as a sweep rule (TEAL, CATS): the sweep value is a target sparsity; thresholds are
  calibrated on the calibration text (`actsparse.speed.calibrate`), uniformly or by TEAL's greedy
  allocation (`methods.allocation`), and cached in the run folder (`methods.thresholds`).
- `wina_top_p`, `wina_top_k` (WINA): the mask chosen on |v|·column norms (`methods.wina`).
- `top_p_outlier`: outliers above m × the row median kept outside top-p's budget (`methods.outlier_topp`).
- `predictor` (Deja Vu style): a low-rank predictor per layer guesses top-p's intermediate mask from
  x (`methods.predictor`); the sweep value is the p it was trained to imitate.

`point_spec` turns a stored point (target, rule, value) into the `SparsitySpec` that runs it, with the
method's data resolved from the model; `actsparse.sparsify` (re-exported here) runs a spec of any rule.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from actsparse.methods.outlier_topp import DEFAULT_M, check_m, reference_top_p_outlier_mask, top_p_outlier_mask
from actsparse.methods.wina import WINA_BASE, column_norms, reference_wina_mask, wina_top_k_mask, wina_top_p_mask
from actsparse.sparsity.instrument import sparsify
from actsparse.sparsity.registry import RULES
from actsparse.sparsity.spec import SparsitySpec

__all__ = [
    "ALLOCATIONS",
    "METHOD_RULES",
    "MethodOptions",
    "method_mask",
    "point_spec",
    "reference_method_mask",
    "sparsify",
    "with_model_data",
]

METHOD_RULES: tuple[str, ...] = tuple(name for name, rule in RULES.items() if rule.method)
"""Rules whose mask reads data resolved from the model (`method_mask`), from the registry."""

ALLOCATIONS: tuple[str, ...] = ("uniform", "greedy")
"""How `threshold` spreads a model-level sparsity over layers: the same in each, or TEAL's greedy search."""


@dataclass(frozen=True)
class MethodOptions:
    """The settings of the methods, bound to a run folder (so that its points compare)."""

    allocation: str = "uniform"
    outlier_m: float = DEFAULT_M
    calibration: Path | None = None  # a plain-text file; None: the built-in text
    calibration_tokens: int = 4096
    predictor_rank: int = 64
    run_dir: Path | None = None  # where calibrations and predictors are cached

    def validate(self) -> None:
        """ValueError on a bad option (before any model work)."""
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose from {', '.join(ALLOCATIONS)}")
        check_m(self.outlier_m)
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise ValueError(f"calibration text {self.calibration} is not a readable file")
        if self.calibration_tokens < 64:
            raise ValueError(f"--calibration-tokens must be at least 64, got {self.calibration_tokens}")
        if self.predictor_rank < 1:
            raise ValueError(f"--predictor-rank must be at least 1, got {self.predictor_rank}")

    def text(self) -> str:
        from actsparse.speed.calibrate import calibration_text

        return calibration_text(self.calibration)

    def text_id(self) -> str:
        """A short digest of the calibration text and token count, naming cached calibrations."""
        digest = hashlib.sha256(self.text().encode()).hexdigest()[:12]
        return f"{digest}-{self.calibration_tokens}"

    def settings(self, rules: list[str]) -> dict[str, Any]:
        """What must stay the same for the given rules within one run folder."""
        out: dict[str, Any] = {}
        if "threshold" in rules or "predictor" in rules:
            out["calibration_text"] = self.text_id()
        if "threshold" in rules:
            out["allocation"] = self.allocation
        if "top_p_outlier" in rules:
            out["outlier_m"] = self.outlier_m
        if "predictor" in rules:
            out["predictor_rank"] = self.predictor_rank
        return out


def method_mask(
    spec: SparsitySpec, layer: int, vector: str, v: torch.Tensor, x: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep-mask of a method rule at (layer, vector); `x` is the FFN input (the predictor reads it)."""
    if spec.rule in WINA_BASE:
        norms = spec.data[layer][vector]
        fn = wina_top_p_mask if spec.rule == "wina_top_p" else wina_top_k_mask
        return fn(v, spec.value, norms)
    if spec.rule == "top_p_outlier":
        return top_p_outlier_mask(v, spec.value, spec.data)
    if spec.rule == "predictor":
        if x is None:
            raise ValueError(f"the predictor of layer {layer} saw no FFN input")
        return spec.data[layer].predict_mask(x).reshape(v.shape)
    raise ValueError(f"{spec.rule!r} is not a method rule")


def reference_method_mask(v: torch.Tensor, rule: str, value: float, data: Any) -> torch.Tensor:
    """The slow, obviously-correct mask of a method rule (`data`: WINA norms, or m of top_p_outlier)."""
    if rule in WINA_BASE:
        return reference_wina_mask(v, rule, value, data)
    if rule == "top_p_outlier":
        return reference_top_p_outlier_mask(v, value, data)
    raise ValueError(f"no reference for {rule!r}")


def with_model_data(model: nn.Module, spec: SparsitySpec, options: MethodOptions | None = None) -> SparsitySpec:
    """`spec` with the data its method reads from the model alone: WINA's column norms, top_p_outlier's m.
    A predictor is fitted on calibration text, so it needs a tokenizer: `point_spec` builds it."""
    options = options or MethodOptions()
    if spec.rule in WINA_BASE:
        return SparsitySpec(spec.target, spec.rule, spec.value, data=column_norms(model))
    if spec.rule == "top_p_outlier":
        return SparsitySpec(spec.target, spec.rule, spec.value, data=check_m(options.outlier_m))
    if spec.rule == "predictor":
        raise ValueError(
            "the predictor rule needs fitted predictors: build its spec with "
            "actsparse.methods.point_spec(model, tokenizer, target, 'predictor', p, options)"
        )
    return spec


def point_spec(
    model: nn.Module, tokenizer: Any, target: str, rule: str, value: float, options: MethodOptions | None
) -> SparsitySpec:
    """The spec that runs a sweep point: the plain spec for the rules, the method's data resolved otherwise."""
    options = options or MethodOptions()
    if rule == "threshold":
        from actsparse.methods.thresholds import cached_thresholds

        return SparsitySpec(target, rule, cached_thresholds(model, tokenizer, target, value, options))
    spec = SparsitySpec(target, rule, value)
    if rule == "predictor":
        from actsparse.methods.predictor import cached_predictors

        return SparsitySpec(
            target, rule, spec.value, data=cached_predictors(model, tokenizer, target, spec.value, options)
        )
    return with_model_data(model, spec, options)
