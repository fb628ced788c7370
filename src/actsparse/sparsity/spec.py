"""What to sparsify: a target (which FFN vector), a rule and its value."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actsparse.sparsity.registry import RULE_NAMES, get_rule

__all__ = ["RULE_NAMES", "TARGETS", "VECTORS", "SparsitySpec", "Thresholds", "check_target", "target_vectors"]

TARGETS: tuple[str, ...] = ("input", "gate", "up", "intermediate", "all_inputs")
"""The five targets of SPEC §1; `all_inputs` is `input` and `intermediate` together."""

VECTORS: tuple[str, ...] = ("input", "gate", "up", "intermediate")
"""The four activation vectors a rule can act on."""

Thresholds = dict[int, dict[str, float]]
"""Calibrated thresholds: layer index → {vector: τ}."""


def check_target(target: str) -> str:
    """`target` if it is one of `TARGETS`, else a ValueError naming the valid ones."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    return target


def target_vectors(target: str) -> tuple[str, ...]:
    """The activation vectors a target sparsifies."""
    return ("input", "intermediate") if target == "all_inputs" else (target,)


@dataclass(frozen=True)
class SparsitySpec:
    """A sparsification request, validated on construction.

    `value` is p for top_p and max_p, the kept fraction f for top_k, and for `threshold` either a
    mapping layer → τ (or layer → {vector: τ}) or the path of a file written by `actsparse calibrate`.
    `data` is what a method of `actsparse.methods` resolved from the model (WINA's column norms,
    top_p_outlier's factor m, the trained predictors); None for the rules of `actsparse.sparsity.rules`.
    """

    target: str
    rule: str
    value: Any
    thresholds: Thresholds = field(default_factory=dict, compare=False, repr=False)
    data: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        check_target(self.target)
        rule = get_rule(self.rule)
        rule.check_target(self.target)
        if self.rule == "threshold":
            object.__setattr__(self, "thresholds", _load_thresholds(self.value, self.target))
            return
        object.__setattr__(self, "value", rule.check_value(self.value))

    @property
    def vectors(self) -> tuple[str, ...]:
        return target_vectors(self.target)

    def value_for(self, layer: int, vector: str) -> float:
        """The rule's parameter at (layer, vector): p, f, or the calibrated τ."""
        if self.rule != "threshold":
            return float(self.value)
        try:
            return self.thresholds[layer][vector]
        except KeyError:
            raise ValueError(f"no calibrated threshold for layer {layer}, vector {vector!r}") from None

    @property
    def label(self) -> str:
        value = "calibrated" if self.rule == "threshold" else f"{self.value:g}"
        return f"{self.target}/{self.rule}={value}"


def _load_thresholds(value: Any, target: str) -> Thresholds:
    """Read thresholds from a mapping or a calibration file into layer → {vector: τ}."""
    if isinstance(value, (str, Path)):
        path = Path(value)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read thresholds from {path}: {err}") from None
        if data.get("target") not in (None, target):
            raise ValueError(f"{path} was calibrated for target {data['target']!r}, not {target!r}")
        value = data.get("thresholds", data)
    if not isinstance(value, Mapping) or not value:
        raise ValueError("threshold rule needs per-layer thresholds: {layer: tau} or a calibration file")
    out: Thresholds = {}
    for layer, taus in value.items():
        if not isinstance(taus, Mapping):
            taus = {vector: taus for vector in target_vectors(target)}
        entry = {}
        for vector, tau in taus.items():
            tau = float(tau)
            if not (math.isfinite(tau) and tau >= 0):
                raise ValueError(f"threshold for layer {layer}, {vector} must be finite and ≥ 0, got {tau}")
            entry[str(vector)] = tau
        out[int(layer)] = entry
    return out
