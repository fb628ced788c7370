"""Analysis of sweeps, written once: statistics (ratios of paired means, the bootstrap), curves and
critical sparsity (the paper's quantity on each task's metric, or a named criterion), damage at matched
sparsity (the proxies: mean KL and answer agreement), power, `summary.json`, and the comparison of the
field's methods.

- `statistics`: ratio, bootstrap weights, percentile intervals; the one place a generator is made.
- `curves`: `Criterion`, `Curve`, `build_curve`, `analyse_curve`, `paired_difference`.
- `damage`: `matched_difference`, `verdict`.
- `power`: `predicted_documents`.
- `summary`: `summarize`, `write_summary`.
- `comparison`: `compare` (every method of several run folders on one footing).
"""

from actsparse.analysis.curves import (
    PAPER,
    THRESHOLD,
    Criterion,
    Critical,
    Curve,
    CurveAnalysis,
    achieved_sparsity,
    analyse_curve,
    bootstrap_critical,
    build_curve,
    critical_record,
    critical_sparsity,
    critical_sparsity_batch,
    normalized_performance,
    paired_difference,
    paired_values,
    task_measure_key,
)
from actsparse.analysis.damage import MATCHED_SPARSITIES, matched_difference, measure_at, verdict
from actsparse.analysis.power import POWER_TARGET, predicted_documents
from actsparse.analysis.statistics import (
    LEVEL,
    RESAMPLES,
    draw_weights,
    generator,
    mean_over_tasks,
    paired_ratio,
    percentile_interval,
    ratio,
    resample_weights,
)
from actsparse.analysis.summary import (
    agreement,
    curves,
    grouped_results,
    mean_kl,
    point_bands,
    point_measure,
    summarize,
    task_ratio,
    to_json,
    write_summary,
)

__all__ = [
    "LEVEL",
    "MATCHED_SPARSITIES",
    "PAPER",
    "POWER_TARGET",
    "RESAMPLES",
    "THRESHOLD",
    "Criterion",
    "Critical",
    "Curve",
    "CurveAnalysis",
    "achieved_sparsity",
    "agreement",
    "analyse_curve",
    "bootstrap_critical",
    "build_curve",
    "critical_record",
    "critical_sparsity",
    "critical_sparsity_batch",
    "curves",
    "draw_weights",
    "generator",
    "grouped_results",
    "matched_difference",
    "mean_kl",
    "mean_over_tasks",
    "measure_at",
    "normalized_performance",
    "paired_difference",
    "paired_ratio",
    "paired_values",
    "percentile_interval",
    "point_bands",
    "point_measure",
    "predicted_documents",
    "ratio",
    "resample_weights",
    "summarize",
    "task_measure_key",
    "task_ratio",
    "to_json",
    "verdict",
    "write_summary",
]
