"""Marks on the per-layer heatmaps for the layers with massive activations (`actsparse.study.outliers`).

A run folder holding `outliers.json` (written by `actsparse outliers --out RUN_DIR`) has it loaded into
the summary as `summary["outliers"]`; each heatmap then labels those layers' ticks in red with a ◆.
"""

from __future__ import annotations

from typing import Any

from actsparse.sparsity.spec import target_vectors


def massive_layers_for(summary: dict[str, Any], target: str) -> set[int]:
    """Layers with massive activations in any vector of `target` (the input's, if those were not measured)."""
    found = (summary.get("outliers") or {}).get("massive_layers") or {}
    vectors = [v for v in target_vectors(target) if v in found] or ["input"]
    return {int(layer) for v in vectors for layer in found.get(v, [])}


def mark_outlier_layers(ax: Any, summary: dict[str, Any], target: str, layers: list[int], axis: str = "x") -> None:
    """Label the ticks (on `axis`) of heatmap layers that hold massive activations (columns or rows = `layers`)."""
    marked = massive_layers_for(summary, target)
    if not marked:
        return
    get_ticks, set_ticks = getattr(ax, f"get_{axis}ticks"), getattr(ax, f"set_{axis}ticks")
    ticks = sorted(set(get_ticks().astype(int).tolist()) | {i for i, layer in enumerate(layers) if layer in marked})
    set_ticks(ticks, [f"◆ {layers[i]}" if layers[i] in marked else str(layers[i]) for i in ticks])
    for label, i in zip(getattr(ax, f"get_{axis}ticklabels")(), ticks, strict=True):
        if layers[i] in marked:
            label.set_color("tab:red")
    getattr(ax, f"set_{axis}label")("layer (◆ red: massive activations)")
