"""`transfer.md` and its figures: retention per task of an operating point fixed on other tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from actsparse.report.structure import densities, retention_figure, save, task_layer_heatmap
from actsparse.study.store import atomic_path


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def token_sparsities(out_dir: Path, target: str, tasks: list[str]) -> dict[str, np.ndarray]:
    """task → per-token sparsity at the target's fixed point (from OUT/tokens)."""
    found = {}
    for task in tasks:
        path = out_dir / "tokens" / f"{target}__{task}.npy"
        if path.exists():
            found[task] = np.load(path)
    return found


def write_transfer_report(out_dir: str | Path) -> list[Path]:
    """transfer.md and its PNGs from OUT/transfer.json and OUT/tokens; return the written paths."""
    out_dir = Path(out_dir)
    data: dict[str, Any] = json.loads((out_dir / "transfer.json").read_text())
    command = data.get("command") or "actsparse transfer"
    done = {t for rows in data["retention"].values() for t in rows}
    tasks = [t for t in [*data["sources"], *data["destinations"]] if t in done]
    counts = ", ".join(f"{t}: {data['n_docs'][t]}" for t in data["sources"])
    grid = ", ".join(f"{v:g}" for v in data["source_values"])
    calibrated = ", and per-layer thresholds are calibrated on the source prompts to the critical sparsity there"
    images = [save(retention_figure(data), out_dir / "retention.png")]
    captions = {"retention.png": "Retention per task (95 % paired-bootstrap intervals)"}
    for target in data["retention"]:
        per_layer = {t: r["sparsity_per_layer"] for t, r in data["retention"][target].items()}
        name = f"heatmap_tasks_{target}.png"
        title = f"{data['model']}: per-layer sparsity per task at {data['specs'][target]}"
        images.append(save(task_layer_heatmap(per_layer, title), out_dir / name))
        captions[name] = f"Per-layer sparsity of {target} on each task at its fixed point"
        tokens = token_sparsities(out_dir, target, tasks)
        if tokens:
            name = f"density_{target}.png"
            title = f"{data['model']}: per-token sparsity at {data['specs'][target]}"
            images.append(save(densities(tokens, title), out_dir / name))
            captions[name] = f"Density of per-token sparsity of {target} per task (paper Figure 3b)"
    md = [
        f"# Transfer of operating points: {data['model']}",
        "",
        f"Produced by `{command}`."
        + ("" if data.get("complete", True) else f" Unfinished: tasks done so far: {', '.join(tasks)}."),
        "",
        f"Each target's operating point is fixed on the source tasks {', '.join(data['sources'])} "
        f"({counts} documents): a top_p sweep over p ∈ {{{grid}}} gives the p at which their normalised "
        "performance crosses 99 % (linear interpolation between the bracketing points)"
        + (calibrated if data["rule"] == "threshold" else "")
        + ". That point is then evaluated, unchanged, on every task. Retention = mean sparse score / mean dense "
        "score on the same documents; for bits-per-byte tasks (bpb) it is mean dense bpb / mean sparse bpb "
        f"(higher is better either way). Intervals: 95 % paired bootstrap over documents, "
        f"{data['bootstrap']['resamples']} resamples, the same draw for dense and sparse.",
        "",
        "## Operating points (fixed on the source tasks)",
        "",
        "| target | point | source critical sparsity | its 95 % CI | between p | lower bound |",
        "|---|---|---|---|---|---|",
    ]
    for target, p in data["operating_points"].items():
        c = data.get("source_critical", {}).get(f"{target}/top_p") or {}
        md.append(
            f"| {target} | {data['specs'][target]} | {_pct(p['sparsity'])} | {_pct(c.get('ci_low'))} – "
            f"{_pct(c.get('ci_high'))} | {p['bracket'][0]:g} – {p['bracket'][1]:g} | "
            f"{'yes' if p['lower_bound'] else ''} |"
        )
    md += [
        "",
        "## Retention per task",
        "",
        "| target | task | role | documents | measure | dense | sparse | retention | 95 % CI | sparsity | mean KL |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for target, rows in data["retention"].items():
        for task, r in rows.items():
            kl = "–" if r["kl"] is None else f"{r['kl']:.4f}"
            md.append(
                f"| {target} | {task} | {r['role']} | {r['n']} | {r['measure']} ({r['metric']}) | "
                f"{_ratio(r['dense'])} | {_ratio(r['sparse'])} | {_ratio(r['value'])} | "
                f"{_ratio(r['ci_low'])} – {_ratio(r['ci_high'])} | {_pct(r['sparsity'])} | "
                f"{kl} |"
            )
    for path in images:
        md += [
            "",
            f"## {captions[path.name]}",
            "",
            f"![{captions[path.name]}]({path.name})",
            "",
            f"Command: `{command}`",
        ]
    report = out_dir / "transfer.md"
    tmp = atomic_path(report)
    tmp.write_text("\n".join(md) + "\n", encoding="utf-8")
    os.replace(tmp, report)
    return [report, *images]
