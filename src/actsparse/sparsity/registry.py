"""The one list of rules: each rule is a `Rule` object holding what its value means, its range, which end
is dense, its default sweep values and bisection grid in its own units, what it needs before it runs,
its mask and reference functions and the kernels that serve it.

Everything that names rules reads `RULES` (`SparsitySpec`, `sparsify`, `accelerate`, the sweep, the
bisection, `profile`, `study` and every --help). This module imports no torch: the mask and reference
functions are named by import path and resolved on first use, so that --help lists the rules fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import Any

__all__ = ["METHOD_MASK", "MODEL_DATA", "PAPER_GRID", "RULES", "RULE_NAMES", "Rule", "get_rule", "resolve"]

PAPER_GRID: tuple[float, ...] = (
    1.0, 0.995, 0.99, 0.985, 0.98, 0.975, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91,
    0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10, 0.0,
)  # fmt: skip
"""The paper's grid of p (SPEC §4), densest first."""

FRACTION_GRID: tuple[float, ...] = (
    1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05, 0.0,
)  # fmt: skip
"""A fraction kept f in steps of 5 %, densest first (top_k keeps at least one entry at f = 0)."""

SPARSITY_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
"""Target sparsities 0–100 % in steps of 5 %, densest first."""

MAX_P_GRID: tuple[float, ...] = (
    0.0, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0,
)  # fmt: skip
"""max_p's grid, densest first, in its own unit (a fraction of max|v|): the p grid is useless here, since
max_p = 0.1 already zeroes 75 % of input and 86 % of intermediate on SmolLM2-135M. Measured sparsity
(`actsparse profile`-style prefill over 3 × the built-in paragraph, float32 CPU):
  SmolLM2-135M  input         0.001: 1.3 %  0.002: 2.7 %  0.005: 6.5 %  0.01: 12.6 %  0.02: 23.7 %  0.05: 51.4 %
                gate          0.001: 0.7 %  0.002: 1.4 %  0.005: 3.6 %  0.01:  7.2 %  0.02: 14.9 %  0.05: 37.4 %
                up            0.001: 0.5 %  0.002: 1.0 %  0.005: 2.6 %  0.01:  5.1 %  0.02: 10.2 %  0.05: 24.6 %
                intermediate  0.001: 6.5 %  0.002: 10.9 % 0.005: 20.5 % 0.01: 31.8 %  0.02: 47.1 %  0.05: 70.7 %
The 99 % crossings on the task metric are recorded at `MAX_P_SWEEP`; 0.0001 opens the grid because
SmolLM2's intermediate loses its first answer at 0.0005."""

MAX_P_SWEEP: tuple[float, ...] = (0.0001, 0.0002, 0.0005, 0.001, 0.005, 0.02, 0.05)
"""max_p's default sweep values: at least two points before the 99 % crossing and one past it on every target of
SmolLM2-135M and on input and intermediate of Gemma 3 270M. Measured on the task metric (acc_norm of arc_easy and
piqa as lm-evaluation-harness defines it, 60 seeded validation documents each, float32 CPU; normalised performance
= mean over the two tasks of sparse / dense), with
    actsparse sweep --model smollm2-135m --rules max_p --tasks arc_easy,piqa --limit 60
    actsparse sweep --model gemma3-270m --rules max_p --targets input,intermediate --tasks arc_easy,piqa --limit 60
(plus 0.002 and 0.01 on SmolLM2). The crossing lies between the last value ≥ 99 % and the first below
(value: achieved sparsity, normalised performance):
  SmolLM2-135M (dense 0.55, 0.70)  input         0.002: 2.6 %, 1.000  →  0.005:  6.2 %, 0.985
                                   gate          0.02: 14.4 %, 1.018  →  0.05:  35.6 %, 0.934
                                   up            0.01:  4.8 %, 1.000  →  0.02:   9.5 %, 0.973
                                   intermediate  0.0002: 2.0 %, 1.000 →  0.0005: 4.0 %, 0.985
  Gemma 3 270M (dense 0.60, 0.70)  input         0.001: 1.9 %, 1.000  →  0.005:  8.8 %, 0.986
                                   intermediate  0.005: 35.0 %, 1.000 →  0.02:  72.7 %, 0.946
With 60 documents one changed answer moves arc_easy's ratio by about 3 %, so the early crossings (SmolLM2's input
and intermediate, Gemma's input) are a single document each: the values bracket them with room on both sides,
and `MAX_P_GRID` refines between. top_p's defaults bracket its crossings on SmolLM2 the same way: input between
dense and p = 0.99 (11.8 %, 0.973), intermediate between 0.95 (36.5 %, 1.003) and 0.9 (48.5 %, 0.976)."""


@dataclass(frozen=True)
class Rule:
    """One sparsification rule, as every command sees it.

    `value` says what the number a user gives means, in its unit; `dense` is the value that keeps every
    entry and `sparsest` the other end of [low, high]. `sweep_values` are a plain sweep's defaults,
    `grid` the values `study` and `--search bisect` scan (both densest first). `needs` lists what must be
    resolved before it runs; `mask` and `reference` name the keep-mask and the slow reference by import
    path ("module:function"); `kernels` names the fast paths that serve it (`cpu_fused`, `triton`).
    """

    name: str
    value: str
    dense: float
    sparsest: float
    sweep_values: tuple[float, ...]
    grid: tuple[float, ...]
    mask: str
    reference: str | None
    needs: tuple[str, ...] = ()
    kernels: tuple[str, ...] = ()
    data: str | None = None  # what `SparsitySpec.data` holds for it, resolved from the model
    targets: tuple[str, ...] | None = None  # None: every target
    low: float = 0.0
    high: float = 1.0

    @property
    def sparser(self) -> str:
        """'lower' or 'higher': the direction of the value that zeroes more."""
        return "lower" if self.sparsest < self.dense else "higher"

    @property
    def method(self) -> bool:
        """Whether its mask reads data resolved from the model (`actsparse.methods.point_spec`), not v alone;
        `accelerate` runs only the rules that are not."""
        return self.data is not None

    def check_value(self, value: Any) -> float:
        """`value` as a float in [low, high]; a ValueError that names the rule, its unit and range otherwise."""
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{self.name} needs a number in [{self.low:g}, {self.high:g}], got {value!r}: {self.value}"
            ) from None
        if not (math.isfinite(number) and self.low <= number <= self.high):
            span = f"[{self.low:g}, {self.high:g}]"
            raise ValueError(f"{self.name} value must lie in {span}, got {number:g}: {self.value}")
        return number

    def check_target(self, target: str) -> None:
        """A ValueError if the rule cannot act on `target`."""
        if self.targets is not None and target not in self.targets:
            raise ValueError(f"{self.name} acts on {', '.join(self.targets)} only, not {target!r}")

    def ordered(self, values: Iterable[float]) -> list[float]:
        """`values` from the densest to the sparsest."""
        return sorted((float(v) for v in values), reverse=self.sparser == "lower")

    def mask_fn(self) -> Callable[..., Any]:
        """The keep-mask function, imported on first use."""
        return resolve(self.mask)

    def reference_fn(self) -> Callable[..., Any] | None:
        """The slow, obviously-correct reference the tests hold the mask to (None: none)."""
        return None if self.reference is None else resolve(self.reference)

    def describe(self, grid: Sequence[float] | None = None) -> str:
        """One line for `study`: the value's meaning, its dense end and its grid (its own unless given)."""
        listed = ", ".join(f"{v:g}" for v in (self.grid if grid is None else grid))
        needs = f"; needs {', '.join(self.needs)}" if self.needs else ""
        return f"{self.name}: {self.value}, dense at {self.dense:g}, sparser {self.sparser}{needs}; grid {listed}"


def resolve(path: str) -> Any:
    """The object at "module:name.attribute", imported on first use."""
    module, _, name = path.partition(":")
    found: Any = import_module(module)
    for part in name.split("."):
        found = getattr(found, part)
    return found


P_LIKE: dict[str, Any] = dict(dense=1.0, sparsest=0.0, sweep_values=(0.99, 0.95, 0.85), grid=PAPER_GRID)
"""The ends and values of a rule whose value is a p of top_p: the paper's grid, and 0.99, 0.95, 0.85 (p values around
the 99 % crossing of a small model, few enough for a 2-core machine)."""

FRACTION_LIKE: dict[str, Any] = dict(dense=1.0, sparsest=0.0, sweep_values=(0.9, 0.7, 0.5), grid=FRACTION_GRID)
"""The ends and values of a rule whose value is a fraction of entries kept."""

_RULES = "actsparse.sparsity.rules"
_METHODS = "actsparse.methods"

METHOD_MASK = f"{_METHODS}:method_mask"
"""(spec, layer, vector, v, x) → keep-mask of a method rule at one site: named, not imported, since the methods
import the instrumentation that calls it."""

MODEL_DATA = f"{_METHODS}:with_model_data"
"""(model, spec) → the spec with the data its method reads from the model (named for the same reason)."""

RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule(
            "top_p",
            "p, the fraction of ‖v‖₁ kept",
            **P_LIKE,
            mask=f"{_RULES}:top_p_mask",
            reference=f"{_RULES}:reference_mask",
            kernels=("cpu_fused", "triton"),
        ),
        Rule(
            "top_k",
            "f, the fraction of entries kept",
            **FRACTION_LIKE,
            mask=f"{_RULES}:top_k_mask",
            reference=f"{_RULES}:reference_mask",
            kernels=("cpu_fused",),
        ),
        Rule(
            "max_p",
            "p, a fraction of max|v| below which entries are zeroed",
            dense=0.0,
            sparsest=1.0,
            sweep_values=MAX_P_SWEEP,
            grid=MAX_P_GRID,
            mask=f"{_RULES}:max_p_mask",
            reference=f"{_RULES}:reference_mask",
        ),
        Rule(
            "threshold",
            "a target sparsity, reached by per-layer τ calibrated offline (keep |v| > τ)",
            dense=0.0,
            sparsest=1.0,
            sweep_values=(0.1, 0.3, 0.5),
            grid=SPARSITY_GRID,
            mask=f"{_RULES}:threshold_mask",
            reference=f"{_RULES}:reference_mask",
            needs=("calibration",),
            kernels=("cpu_fused",),
        ),
        Rule(
            "wina_top_p",
            "p, the fraction of Σ|v_i|·‖W_:,i‖₂ kept",
            **P_LIKE,
            mask=f"{_METHODS}.wina:wina_top_p_mask",
            reference=f"{_METHODS}.wina:reference_wina_mask",
            needs=("column norms",),
            data="layer → {vector: column norms}",
        ),
        Rule(
            "wina_top_k",
            "f, the fraction of entries kept, ranked by |v_i|·‖W_:,i‖₂",
            **FRACTION_LIKE,
            mask=f"{_METHODS}.wina:wina_top_k_mask",
            reference=f"{_METHODS}.wina:reference_wina_mask",
            needs=("column norms",),
            data="layer → {vector: column norms}",
        ),
        Rule(
            "top_p_outlier",
            "p of top_p over the entries below m × the row median (those above are always kept)",
            **P_LIKE,
            mask=f"{_METHODS}.outlier_topp:top_p_outlier_mask",
            reference=f"{_METHODS}.outlier_topp:reference_top_p_outlier_mask",
            needs=("outlier factor m",),
            data="m",
        ),
        Rule(
            "predictor",
            "p of the top_p mask that a low-rank predictor, fitted on calibration text, imitates",
            **P_LIKE,
            mask=f"{_METHODS}.predictor:LowRankPredictor.predict_mask",
            reference=None,
            needs=("calibration", "a fitted predictor"),
            data="layer → LowRankPredictor",
            targets=("gate", "up", "intermediate"),
        ),
    )
}
"""Rule name → `Rule`, in the order commands list them."""

RULE_NAMES: tuple[str, ...] = tuple(RULES)
"""The names of `RULES`."""


def get_rule(name: str) -> Rule:
    """The rule called `name`; a ValueError naming the known ones otherwise."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}") from None
