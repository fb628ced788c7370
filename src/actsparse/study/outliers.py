"""Massive activations (SPEC §7, the paper's open question 1): a few dimensions of the FFN's vectors
with |v| orders of magnitude above the rest, which take most of the L1 norm that top-p spends.

On calibration text, per layer and vector: the largest per-token ratio max|v| / median|v|, its median
over tokens, how often a token holds an entry above m × its median (default m = 100, as
`top_p_outlier` uses), and the dimensions where those entries sit. A layer is *massive* when such
entries sit in fixed dimensions, as massive activations do: its most frequent dimension is above the
bar on at least half of the tokens that hold one. (The intermediate vector's heavy tail puts some entry
above 100 × the median on many tokens, scattered over dimensions: that is not flagged.) `outliers.json`
in a run folder lets every report mark these layers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from actsparse.sparsity.instrument import replaced_forwards, select_ffns
from actsparse.study.store import atomic_path

__all__ = ["FILE", "LayerOutliers", "find_outliers", "load_outliers", "massive_layers", "save_outliers"]

FILE = "outliers.json"
DEFAULT_VECTORS = ("input", "intermediate")
TOP_DIMS = 3


@dataclass
class LayerOutliers:
    """Massive activations of one (layer, vector) on the calibration tokens."""

    layer: int
    vector: str
    tokens: int
    max_abs: float  # largest |v| seen
    max_ratio: float  # largest per-token max|v| / median|v|
    median_ratio: float  # median over tokens of max|v| / median|v|
    token_fraction: float  # tokens holding an entry above m × their median |v|
    dims: list[tuple[int, float]]  # up to TOP_DIMS dimensions most often above the bar, with how often (per token)

    @property
    def massive(self) -> bool:
        return self.token_fraction > 0 and bool(self.dims) and self.dims[0][1] >= 0.5 * self.token_fraction


class _Stats:
    def __init__(self, width: int):
        self.tokens, self.max_abs, self.max_ratio = 0, 0.0, 0.0
        self.ratios: list[torch.Tensor] = []
        self.flagged_tokens = 0
        self.dim_counts = torch.zeros(width, dtype=torch.long)

    def add(self, rows: torch.Tensor, m: float) -> None:
        a = rows.abs().float()
        median = a.median(dim=-1, keepdim=True).values
        peak = a.amax(dim=-1, keepdim=True)
        ratio = (peak / median.clamp_min(torch.finfo(torch.float32).tiny)).squeeze(-1)
        above = a > m * median
        self.tokens += a.shape[0]
        self.max_abs = max(self.max_abs, float(peak.max()))
        self.max_ratio = max(self.max_ratio, float(ratio.max()))
        self.ratios.append(ratio)
        self.flagged_tokens += int(above.any(dim=-1).sum())
        self.dim_counts += above.sum(dim=0)


def find_outliers(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    m: float = 100.0,
    vectors: Sequence[str] = DEFAULT_VECTORS,
) -> list[LayerOutliers]:
    """Measure massive activations of `vectors` in every FFN of the dense model over `batches`."""
    ffns = select_ffns(model, None)
    stats: dict[tuple[int, str], _Stats] = {}
    device = next(model.parameters()).device

    def make_forward(ffn, tokens):
        def site(vector, v, expert=None, token_index=None):
            if vector in vectors:
                rows = tokens.real_rows(v, token_index).cpu()
                stats.setdefault((ffn.layer, vector), _Stats(v.shape[-1])).add(rows, m)
            return v

        return partial(ffn.adapter.forward, ffn.module, site)

    with torch.no_grad(), replaced_forwards(model, ffns, make_forward):
        for batch in batches:
            model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    out = []
    for (layer, vector), s in sorted(stats.items()):
        counts = s.dim_counts
        top = [int(i) for i in counts.argsort(descending=True)[:TOP_DIMS] if counts[i] > 0]
        out.append(
            LayerOutliers(
                layer=layer,
                vector=vector,
                tokens=s.tokens,
                max_abs=s.max_abs,
                max_ratio=s.max_ratio,
                median_ratio=float(torch.cat(s.ratios).median()),
                token_fraction=s.flagged_tokens / max(1, s.tokens),
                dims=[(i, float(counts[i]) / s.tokens) for i in top],
            )
        )
    return out


def records_from(data: dict[str, Any]) -> list[LayerOutliers]:
    """The records of an outliers.json's content."""
    fields = set(LayerOutliers.__dataclass_fields__)
    return [
        LayerOutliers(**{k: v for k, v in r.items() if k in fields} | {"dims": [tuple(d) for d in r["dims"]]})
        for r in data["layers"]
    ]


def massive_layers(records: Sequence[LayerOutliers] | dict[str, Any], vector: str = "input") -> list[int]:
    """The layers whose `vector` holds massive activations (records, or an outliers.json's content)."""
    rows = (
        records.get("layers", [])
        if isinstance(records, dict)
        else [asdict(r) | {"massive": r.massive} for r in records]
    )
    return sorted({int(r["layer"]) for r in rows if r["vector"] == vector and r["massive"]})


def save_outliers(folder: Path, records: Sequence[LayerOutliers], model: str, m: float) -> Path:
    """Write FOLDER/outliers.json (atomically); return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE
    data = {
        "model": model,
        "m": m,
        "layers": [asdict(r) | {"massive": r.massive} for r in records],
        "massive_layers": {v: massive_layers(records, v) for v in sorted({r.vector for r in records})},
    }
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_outliers(folder: str | Path) -> dict[str, Any] | None:
    """The content of FOLDER/outliers.json, or None when there is none (or it cannot be read)."""
    path = Path(folder) / FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def table(records: Sequence[LayerOutliers]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-layer table."""
    header = [
        "layer",
        "vector",
        "max |v|",
        "max ratio",
        "median ratio",
        "tokens with one",
        "dimensions (share of tokens)",
    ]
    rows = []
    for r in records:
        dims = ", ".join(f"{d} ({share:.1%})" for d, share in r.dims) or "–"
        rows.append(
            [
                str(r.layer),
                r.vector,
                f"{r.max_abs:.3g}",
                f"{r.max_ratio:.3g}",
                f"{r.median_ratio:.3g}",
                f"{r.token_fraction:.2%}",
                dims,
            ]
        )
    return header, rows


def plot(records: Sequence[LayerOutliers], model: str, m: float) -> Any:
    """Per layer, max and median of max|v| / median|v| (log scale), a panel per vector, the bar m drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vectors = sorted(
        {r.vector for r in records}, key=lambda v: list(DEFAULT_VECTORS).index(v) if v in DEFAULT_VECTORS else 9
    )
    fig, axes = plt.subplots(1, len(vectors), figsize=(6 * len(vectors), 4.2), squeeze=False)
    for ax, vector in zip(axes[0], vectors, strict=True):
        rows = [r for r in records if r.vector == vector]
        layers = [r.layer for r in rows]
        ax.bar(
            layers,
            [r.max_ratio for r in rows],
            color=["tab:red" if r.massive else "tab:blue" for r in rows],
            label="max over tokens",
        )
        ax.plot(layers, [r.median_ratio for r in rows], "k.-", label="median over tokens")
        ax.axhline(m, color="gray", ls="--", lw=1, label=f"m = {m:g}")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("max|v| / median|v| per token")
        ax.set_title(f"{vector} (red: massive activations)", fontsize=11)
        ax.legend(fontsize=8)
    fig.suptitle(f"{model}: massive activations on calibration text", fontsize=12)
    fig.tight_layout()
    return fig
