"""Adaptive search (`--search bisect`): find each (target, rule)'s critical sparsity with far fewer
points than a grid, by bisection on the rule's value.

A coarse scan from the dense end (every fourth value of the grid) stops at the first value whose
normalised performance falls below 99 %; bisection over the grid values between it and the last
value above then halves the bracket until the two bracketing points differ by at most `precision` in
achieved sparsity (an absolute fraction: 0.02 is two points), or are neighbours on the grid. For a
monotone curve the full grid's crossing lies inside that bracket, so the critical sparsity, computed
from the evaluated points exactly as for a grid (`analysis.critical_sparsity`), is within
`precision` of the full grid's, and equal to it when the bracket closes on grid neighbours. With
`refine`, bisection goes on between grid neighbours, on the value itself, down to `precision`: closer
to the true crossing than the grid can resolve, so it may differ from the grid's reading. The values
depend only on the results, so a rerun replays the search from the stored points.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from actsparse.analysis import THRESHOLD, Critical, critical_sparsity
from actsparse.sparsity.registry import PAPER_GRID, RULES, get_rule

DENSE_VALUE = {name: rule.dense for name, rule in RULES.items()}
"""Each rule's value that keeps every entry (from the registry, which also holds its sparsest value)."""

DEFAULT_PRECISION = 0.02
"""Default precision of the critical sparsity, in achieved sparsity (two points)."""

STRIDE = 4
"""The scan evaluates every STRIDE-th grid value (and the sparsest) before bisecting."""

MAX_STEPS = 16
"""Bisection steps per curve at most, whatever the precision."""

DIGITS = 6
"""Bisection values are rounded to this many decimals: clean keys in the store and the report."""


@dataclass
class Bisection:
    """The search on one (target, rule) curve; `points` maps each evaluated value to (sparsity, performance).

    A coarse scan from the dense end (every `stride`-th value of `grid`, then the sparsest) stops at
    the first value whose normalised performance falls below the threshold; bisection over the grid
    values between it and the last value above (then, with `refine`, on the value itself) narrows the
    crossing to `precision` in achieved sparsity. Scanning from the dense side finds the *first*
    crossing, as the grid's definition does, even when a noisy curve climbs back above the threshold further on.
    """

    rule: str
    precision: float = DEFAULT_PRECISION
    grid: Sequence[float] | None = None  # None: the rule's own grid (`Rule.grid`)
    stride: int = STRIDE
    threshold: float = THRESHOLD
    refine: bool = False
    points: dict[float, tuple[float, float]] = field(default_factory=dict)  # in evaluation order

    def __post_init__(self) -> None:
        rule = get_rule(self.rule)
        self.grid = tuple(rule.check_value(v) for v in (rule.grid if self.grid is None else self.grid))
        if not 0 < self.precision < 1:
            raise ValueError(f"--precision is a fraction of sparsity in (0, 1), got {self.precision}")
        if self.stride < 1:
            raise ValueError(f"stride must be at least 1, got {self.stride}")

    @property
    def dense_value(self) -> float:
        return get_rule(self.rule).dense

    @property
    def ordered(self) -> list[float]:
        """The grid's values and the sparsest value, from the densest to the sparsest, dense excluded."""
        rule = get_rule(self.rule)
        assert self.grid is not None
        return rule.ordered(({float(v) for v in self.grid} | {rule.sparsest}) - {rule.dense})

    @property
    def scan(self) -> list[float]:
        """The scanned values, from the densest to the sparsest."""
        ordered = self.ordered
        picked = ordered[self.stride - 1 :: self.stride]
        return picked if picked and picked[-1] == ordered[-1] else [*picked, ordered[-1]]

    def bracket(self) -> tuple[tuple[float, float], tuple[float, float] | None]:
        """((value, sparsity) of the sparsest point still ≥ threshold, and of the densest below it, or None)."""
        ok: tuple[float, float] = (self.dense_value, 0.0)
        bad = None
        for value in self.scan:
            if value not in self.points:
                break
            sparsity, performance = self.points[value]
            if performance >= self.threshold:
                ok = (value, sparsity)
            else:
                bad = (value, sparsity)
                break
        if bad is None:
            return ok, None
        for value, (sparsity, performance) in self.points.items():  # the bisection steps, in order
            if min(ok[0], bad[0]) < value < max(ok[0], bad[0]):
                if performance >= self.threshold:
                    ok = (value, sparsity)
                else:
                    bad = (value, sparsity)
        return ok, bad

    def next_value(self) -> float | None:
        """The value to evaluate next, or None when the curve is located (or never crosses)."""
        for value in self.scan:
            if value not in self.points:
                return value
            if not self.points[value][1] >= self.threshold:  # NaN counts as below
                break
        else:
            return None  # even the sparsest value keeps performance: a lower bound
        (ok_value, ok_sparsity), bad = self.bracket()
        assert bad is not None
        steps = len(self.points.keys() - set(self.scan))
        if bad[1] - ok_sparsity <= self.precision or steps >= MAX_STEPS:
            return None
        low, high = sorted((ok_value, bad[0]))
        between = [v for v in self.ordered if low < v < high]
        if between:
            return between[len(between) // 2]
        if not self.refine:
            return None  # grid neighbours: the full grid's bracket
        value = round((ok_value + bad[0]) / 2, DIGITS)
        return None if value in self.points else value

    def record(self, value: float, sparsity: float, performance: float) -> None:
        """Add the evaluated point `value`."""
        self.points[float(value)] = (float(sparsity), float(performance))

    @property
    def done(self) -> bool:
        return self.next_value() is None

    def critical(self) -> Critical:
        """Critical sparsity of the evaluated points, by the grid's definition (SPEC §4)."""
        sparsity = [s for s, _ in self.points.values()]
        performance = [p for _, p in self.points.values()]
        return critical_sparsity(sparsity, performance, self.threshold)


Measure = Callable[[Sequence[tuple[str, str, float]]], dict[tuple[str, str, float], tuple[float, float]]]
"""Evaluates (target, rule, value) points, all of them at once if it can; returns (sparsity, performance)."""


def bisect_curves(
    curves: Sequence[tuple[str, str]],
    measure: Measure,
    precision: float = DEFAULT_PRECISION,
    grid: Sequence[float] | None = None,
    refine: bool = False,
    grids: Mapping[str, Sequence[float]] | None = None,
) -> dict[tuple[str, str], Bisection]:
    """Search every (target, rule) curve; each round asks `measure` for the next value of all open curves.

    A rule's grid is `grids[rule]`, else `grid`, else its own (`Rule.grid`)."""
    grids = grids or {}
    searches = {
        (target, rule): Bisection(rule, precision, grids.get(rule, grid), refine=refine) for target, rule in curves
    }
    while True:
        wanted = {c: v for c, s in searches.items() if (v := s.next_value()) is not None}
        if not wanted:
            return searches
        measured = measure([(target, rule, value) for (target, rule), value in wanted.items()])
        for (target, rule), value in wanted.items():
            searches[(target, rule)].record(value, *measured[(target, rule, value)])


__all__ = [
    "DEFAULT_PRECISION",
    "DENSE_VALUE",
    "MAX_STEPS",
    "PAPER_GRID",
    "STRIDE",
    "Bisection",
    "Measure",
    "bisect_curves",
]
