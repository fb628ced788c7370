"""Report sections of the low-noise measure: critical sparsity beside accuracy's, paired differences
between targets, the power report, and what resampling the sparsity axis changes."""

from __future__ import annotations

import statistics
from typing import Any

Table = tuple[list[str], list[list[str]]]

HEADLINE = "Critical sparsity: low-noise measure (headline) beside accuracy"
DIFFERENCES = "Paired differences of critical sparsity between targets"
POWER = "Power: interval half-width and documents needed for ±2 points"
NAMES = {"p_gold": "gold probability", "bpb": "bits per byte (dense / sparse)"}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _pts(x: float | None) -> str:
    return "–" if x is None else f"±{100 * x:.1f}"


def interval_cell(c: dict[str, Any] | None, signed: bool = False) -> str:
    """'value [low, high]' of a critical sparsity record (signed: of a difference, in points); '≥' for a bound."""
    if not c or c.get("value") is None:
        return "–"
    value = f"{100 * c['value']:+.1f} pts" if signed else _pct(c["value"])
    low, high = c.get("ci_low"), c.get("ci_high")
    span = (
        f"[{100 * low:+.1f}, {100 * high:+.1f}]"
        if signed and low is not None and high is not None
        else (f"[{_pct(low)}, {_pct(high)}]")
    )
    return ("≥ " if c.get("lower_bound") else "") + f"{value} {span}"


def _ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def tables(summary: dict[str, Any]) -> dict[str, Table]:
    """The low-noise sections' tables by title (none for a summary without them)."""
    low = summary.get("critical_sparsity_low_noise")
    if low is None:
        return {}
    from actsparse.report.reading import settled

    acc = summary.get("critical_sparsity", {})
    rows = []
    for label in sorted(low):
        if not settled(summary, label):  # missing points could still move it: no number from part of a curve
            rows.append([label, "incomplete (see Missing points)", "incomplete", "–", "–"])
            continue
        c, a = low[label], acc.get(label, {})
        fixed = c.get("ci_fixed_sparsity")
        rows.append(
            [
                label,
                interval_cell(c),
                interval_cell(a),
                "– (lower bound)" if c.get("lower_bound") else _ratio(c.get("half_width"), a.get("half_width")),
                "–" if not fixed else f"[{_pct(fixed[0])}, {_pct(fixed[1])}]",
            ]
        )
    head = [
        "target/rule",
        "low-noise [95 % CI]",
        "accuracy [95 % CI]",
        "width low-noise / accuracy",
        "low-noise CI, sparsity held fixed",
    ]
    out: dict[str, Table] = {HEADLINE: (head, rows)}
    diffs = summary.get("paired_differences", {})
    if diffs:
        rows = [
            [label, interval_cell(d.get("low_noise"), True), interval_cell(d.get("accuracy"), True)]
            for label, d in diffs.items()
        ]
        out[DIFFERENCES] = (["difference", "low-noise [95 % CI]", "accuracy [95 % CI]"], rows)
    power = summary.get("power", {}).get("curves", {})
    if power:
        rows = []
        for label in sorted(power):
            for measure in ("low_noise", "accuracy"):
                p = power[label].get(measure)
                if p:
                    needed = p.get("documents_needed")
                    rows.append(
                        [
                            label,
                            measure.replace("_", "-"),
                            str(p.get("documents")),
                            _pts(p.get("half_width")),
                            "beyond 10⁶" if needed is None else str(needed),
                        ]
                    )
        out[POWER] = (["target/rule", "measure", "documents per task", "half-width (pts)", "needed for ±2"], rows)
    return out


def measure_names(metrics: dict[str, str]) -> str:
    """'task: measure, …' for the low-noise measure of each task (its score's name where it has none)."""
    return ", ".join(f"{t}: {NAMES.get(m, m + ' (no low-noise measure; its score)')}" for t, m in metrics.items())


def intro(summary: dict[str, Any]) -> list[str]:
    """The paragraphs that say which measure is the headline and what the sparsity resampling changed."""
    low = summary.get("critical_sparsity_low_noise")
    if low is None:
        return []
    metrics = summary.get("low_noise_metrics", {})
    named = measure_names(metrics)
    text = [
        "The headline critical sparsity uses the low-noise measure, the expected accuracy (the gold answer's "
        "probability under a softmax over the choices' log-likelihoods, length-normalised where the metric is "
        "acc_norm) or bits per byte as dense / sparse, with accuracy's beside it on the same paired bootstrap "
        f"({named})."
    ]
    changes = []
    for c in low.values():
        fixed = c.get("ci_fixed_sparsity")
        if fixed and fixed[0] is not None and fixed[1] is not None and c.get("half_width") is not None:
            changes.append(c["half_width"] - (fixed[1] - fixed[0]) / 2)
    if changes and summary.get("sparsity_resampled"):
        text.append(
            "Resampling each point's achieved sparsity with the documents (per-document counts) changed the "
            f"headline intervals' half-widths by {100 * min(changes):+.2f} to {100 * max(changes):+.2f} points "
            f"(median {100 * statistics.median(changes):+.2f}) against holding the sparsity fixed."
        )
    return text
