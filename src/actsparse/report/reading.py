"""What a reader needs beside the numbers: which points a partial run still misses, which intervals are
censored by the range of sparsity a curve reached, and per-point confidence bands of the curves.

The summary (`actsparse.analysis.summarize`) gives critical sparsity and its interval; these helpers
read it (and, for the bands and the plan, the run's store) without changing what it says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from actsparse.study.store import RunStore

Summary = dict[str, Any]
PointId = tuple[str, str, float]
"""(target, rule, value) of a sweep point."""

EPS = 1e-9


def _complete(summary: Summary, label: str) -> list[dict[str, Any]]:
    target, rule = label.split("/", 1)
    return [
        p
        for p in summary.get("points", [])
        if p["target"] == target and p["rule"] == rule and p.get("complete", True) and p["sparsity"] is not None
    ]


def reached(summary: Summary, label: str, task: str | None = None) -> tuple[float, float] | None:
    """(lowest, highest) achieved sparsity among the points a curve's analysis used (None without points)."""
    xs = [p["sparsity"] if task is None else p["sparsity_per_task"].get(task) for p in _complete(summary, label)]
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return (min(xs), max(xs)) if xs else None


def censored(c: dict[str, Any], span: tuple[float, float] | None) -> tuple[bool, bool]:
    """(below, above): an end of the interval at (or beyond) the lowest / highest sparsity the curve reached,
    so the true end may lie further out than the points measured can tell."""
    if span is None or c.get("ci_low") is None or c.get("ci_high") is None:
        return False, False
    return c["ci_low"] <= span[0] + EPS, c["ci_high"] >= span[1] - EPS


def censor_note(flags: tuple[bool, bool]) -> str:
    below, above = flags
    if below and above:
        return "censored at both ends"
    return "censored below" if below else "censored above" if above else ""


def missing(summary: Summary) -> dict[str, list[tuple[float, list[str]]]]:
    """label → [(value, tasks not stored)] of the points this run planned (or that some task has) but lacks."""
    tasks = list(summary.get("tasks", []))
    stored: dict[PointId, set[str]] = {}
    for p in summary.get("points", []):
        stored[(p["target"], p["rule"], float(p["value"]))] = set(p["scores"])
    planned = {(t, r, float(v)) for t, r, v in summary.get("planned", [])} | set(stored)
    out: dict[str, list[tuple[float, list[str]]]] = {}
    for target, rule, value in sorted(planned, key=lambda k: (k[0], k[1], -k[2])):
        lacking = [t for t in tasks if t not in stored.get((target, rule, value), set())]
        if lacking:
            out.setdefault(f"{target}/{rule}", []).append((value, lacking))
    return out


def settled(summary: Summary, label: str, task: str | None = None) -> bool:
    """Whether the missing points of a curve cannot change its critical sparsity: it crossed 99 % and every
    missing value lies beyond the crossing (sparsity grows as p, or top_k's kept fraction, falls)."""
    lacking = missing(summary).get(label, [])
    if not lacking:
        return True
    threshold = summary.get("threshold", 0.99)
    dense = summary.get("dense", {})
    for p in sorted(
        _complete(summary, label), key=lambda p: p["sparsity"] if task is None else p["sparsity_per_task"].get(task, 0)
    ):
        if task is None:
            perf = p["normalized"]
        else:
            score, base = p["scores"].get(task), dense.get(task)
            perf = None if score is None or not base else score / base
        if perf is not None and perf < threshold:
            return all(value < p["value"] for value, _ in lacking)
    return False


def describe_missing(points: Sequence[tuple[float, Sequence[str]]], tasks: Sequence[str]) -> str:
    """'0.9 (every task); 0.8 (piqa)': the missing points of one curve."""
    return "; ".join(f"{v:g} ({'every task' if list(ts) == list(tasks) else ', '.join(ts)})" for v, ts in points)


def planned(store: RunStore) -> list[PointId]:
    """The (target, rule, value) points the sweeps of this folder set out to run (empty if not recorded)."""
    return [tuple(p) for p in store.get_meta("planned") or []]  # type: ignore[misc]


def interval_cell(c: dict[str, Any] | None, signed: bool = False) -> str:
    """'value [low, high]' of a critical sparsity record (signed: of a difference, in points); '≥' for a bound."""
    if not c or c.get("value") is None:
        return "–"
    value = f"{100 * c['value']:+.1f} pts" if signed else f"{100 * c['value']:.1f} %"
    low, high = c.get("ci_low"), c.get("ci_high")
    if low is None or high is None:
        span = "[–]"
    elif signed:
        span = f"[{100 * low:+.1f}, {100 * high:+.1f}]"
    else:
        span = f"[{100 * low:.1f} %, {100 * high:.1f} %]"
    return ("≥ " if c.get("lower_bound") else "") + f"{value} {span}"


__all__ = [
    "censor_note",
    "censored",
    "describe_missing",
    "interval_cell",
    "missing",
    "planned",
    "reached",
    "settled",
]
