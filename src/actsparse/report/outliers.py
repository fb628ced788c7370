"""Marks on the per-layer heatmaps for the layers with massive activations (`actsparse.outliers`).

A run folder holding `outliers.json` (written by `actsparse outliers --out RUN_DIR`) has it loaded into
the summary as `summary["outliers"]`; each heatmap then labels those layers' ticks in red with a ◆.
"""

from __future__ import annotations

from typing import Any

from actsparse.spec import target_vectors


def massive_layers_for(summary: dict[str, Any], target: str) -> set[int]:
    """Layers with massive activations in any vector of `target` (the input's, if those were not measured)."""
    found = (summary.get("outliers") or {}).get("massive_layers") or {}
    vectors = [v for v in target_vectors(target) if v in found] or ["input"]
    return {int(layer) for v in vectors for layer in found.get(v, [])}


def mark_outlier_layers(ax: Any, summary: dict[str, Any], target: str, layers: list[int]) -> None:
    """Label the y ticks of heatmap rows whose layer holds massive activations (rows = `layers`)."""
    marked = massive_layers_for(summary, target)
    if not marked:
        return
    ticks = [i for i, layer in enumerate(layers) if layer in marked]
    ax.set_yticks(sorted(set(ax.get_yticks().astype(int).tolist()) | set(ticks)))
    ax.set_yticklabels(
        [f"◆ {layers[i]}" if layers[i] in marked else str(layers[i]) for i in ax.get_yticks().astype(int)]
    )
    for label, i in zip(ax.get_yticklabels(), ax.get_yticks().astype(int), strict=True):
        if layers[i] in marked:
            label.set_color("tab:red")
    ax.set_ylabel("layer (◆ red: massive activations)")
