"""`actsparse sensitivity`: per-layer and per-task structure at one fixed point.

Sparsify one layer at a time (every layer, or every k-th) and measure the loss in KL and in score; at
the same point with every layer sparsified, the per-layer sparsity of each task (a heatmap) and the
density of per-token sparsity per task (the paper's Figure 3b)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from actsparse.cli.common import (
    add_model_argument,
    add_sample_arguments,
    at_least,
    comma_list,
    make_console,
    parse_limit,
)
from actsparse.models.placement import add_placement_arguments


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sensitivity",
        help="sparsify one layer at a time at a fixed p; per-task heatmaps and per-token densities",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_argument(p)
    add_placement_arguments(p)
    p.add_argument("--tasks", default="arc_easy,piqa", help="comma-separated task names")
    p.add_argument("--target", default="input", help="the target sparsified")
    p.add_argument("--p", type=float, default=0.9, help="the fixed top_p value")
    p.add_argument(
        "--every", type=at_least(1, "--every"), default=1, help="sparsify every k-th layer alone (1: every layer)"
    )
    p.add_argument("--limit", type=parse_limit, default=30, help="documents per task, or 'all'")
    add_sample_arguments(p)
    p.add_argument("--out", type=Path, default=Path("runs/sensitivity"), help="folder for the report")
    return p


def every_kth(layers: list[int], every: int) -> list[int]:
    """Every `every`-th of the model's layers, from the first; ValueError when that leaves one of several
    (a --every meant for a deeper model would test layer 0 alone, silently)."""
    if len(layers) > 1 and every >= len(layers):
        raise ValueError(
            f"--every {every} tests only layer {layers[0]} of this model's {len(layers)} layers: "
            f"give --every {len(layers) - 1} or less"
        )
    return layers[::every]


def run(args: argparse.Namespace) -> int:
    from actsparse.models.placement import from_args
    from actsparse.sparsity.spec import SparsitySpec
    from actsparse.study.store import atomic_path, check_writable
    from actsparse.tasks import get_task, select_docs

    spec = SparsitySpec(args.target, "top_p", args.p)  # bad target or p: an error before model work
    if args.resamples < 10:
        raise ValueError(f"--resamples must be at least 10, got {args.resamples}")
    names = comma_list(args.tasks)
    if not names:
        raise ValueError("no tasks given")
    tasks = {n: get_task(n) for n in names}
    docs = {n: select_docs(t, args.limit, args.seed) for n, t in tasks.items()}
    check_writable(args.out)
    where = from_args(args)  # a bad --device or --dtype, or cuda without a GPU: exit 2 before any model work
    import numpy as np  # here: the checks above answer without torch
    import torch

    from actsparse.analysis import to_json as _finite
    from actsparse.evaluate import evaluate_task
    from actsparse.report.structure import densities, save, sensitivity_figure, task_layer_heatmap
    from actsparse.sparsity.instrument import select_ffns
    from actsparse.study.structure import layer_sensitivity, record_tokens, retention

    command = "actsparse " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["sensitivity"] else "actsparse sensitivity"
    console = make_console(stderr=True)
    from actsparse.models.loading import load_model

    model, tokenizer = load_model(args.model, where.dtype, where.device)
    layers = every_kth(sorted({f.layer for f in select_ffns(model, None)}), args.every)
    dense, refs = {}, {}
    for n in names:
        console.print(f"dense {n} ({len(docs[n])} documents)", highlight=False)
        with torch.no_grad():
            dense[n], refs[n] = evaluate_task(model, tokenizer, tasks[n], docs[n], batch_size=args.batch_size)

    def evaluate() -> dict:
        return {
            n: evaluate_task(model, tokenizer, tasks[n], docs[n], reference=refs[n], batch_size=args.batch_size)[0]
            for n in names
        }

    per_layer, tokens, full = {}, {}, {}
    for n in names:
        console.print(f"{spec.label} on {n}, every layer", highlight=False)
        with torch.no_grad(), record_tokens(model, spec) as (stats, sink):
            result = evaluate_task(model, tokenizer, tasks[n], docs[n], reference=refs[n], batch_size=args.batch_size)[
                0
            ]
        per_layer[n] = stats.to_dict().get("all", {}).get("per_layer", {})
        tokens[n] = sink.per_token()
        full[n] = asdict(retention(dense[n], result, args.resamples, args.seed))
        full[n]["sparsity"] = stats.to_dict().get("all", {}).get("sparsity")
    losses = layer_sensitivity(
        model,
        layers,
        spec,
        evaluate,
        dense,
        args.resamples,
        args.seed,
        done=lambda r: console.print(
            f"layer {r.layer}: sparsity {r.sparsity:.1%}, loss {r.loss:+.2%}", highlight=False
        ),
    )
    records = [
        {"layer": r.layer, "sparsity": r.sparsity, "loss": r.loss, "kl": r.kl,
         "retention": {t: asdict(v) for t, v in r.retention.items()}}
        for r in losses
    ]  # fmt: skip
    data = _finite(
        {
            "model": args.model,
            "command": command,
            "spec": spec.label,
            "tasks": names,
            "n_docs": {n: len(docs[n]) for n in names},
            "all_layers": full,
            "sparsity_per_layer": per_layer,
            "token_sparsity_median": {n: float(np.median(v)) if len(v) else None for n, v in tokens.items()},
            "layers": records,
        }
    )
    out = Path(args.out)
    for n, v in tokens.items():
        np.save(out / f"tokens_{args.target}__{n}.npy", v.astype(np.float32))
    path = out / "sensitivity.json"
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False))
    os.replace(tmp, path)
    title = f"{args.model}: {spec.label}"
    images = [
        save(sensitivity_figure(data["layers"], f"{title}, one layer at a time"), out / "sensitivity.png"),
        save(
            task_layer_heatmap(per_layer, f"{title}: per-layer sparsity per task"),
            out / f"heatmap_tasks_{args.target}.png",
        ),
        save(densities(tokens, f"{title}: per-token sparsity"), out / f"density_{args.target}.png"),
    ]
    md = [
        f"# Per-layer sensitivity and per-task structure: {title}",
        "",
        f"Produced by `{command}`. Documents per task: {', '.join(f'{n}: {len(docs[n])}' for n in names)}.",
        "",
        "Every layer sparsified (retention = sparse / dense score; bpb tasks: dense_bpb / sparse_bpb; "
        "95 % paired bootstrap):",
        "",
        "| task | sparsity | retention | 95 % CI | mean KL | median per-token sparsity |",
        "|---|---|---|---|---|---|",
    ]
    for n in names:
        r = data["all_layers"][n]
        md.append(
            f"| {n} | {100 * (r['sparsity'] or 0):.1f} % | {r['value']:.3f} | {r['ci_low']:.3f} – {r['ci_high']:.3f} | "
            f"{r['kl'] or 0:.4f} | {100 * (data['token_sparsity_median'][n] or 0):.1f} % |"
        )
    md += ["", "One layer sparsified alone:", "", "| layer | sparsity | loss (1 − mean retention) | "
           + " | ".join(f"KL {n}" for n in names) + " |", "|---|---|---|" + "---|" * len(names)]  # fmt: skip
    for r in data["layers"]:
        kls = " | ".join("–" if r["kl"][n] is None else f"{r['kl'][n]:.5f}" for n in names)
        md.append(f"| {r['layer']} | {100 * (r['sparsity'] or 0):.1f} % | {100 * (r['loss'] or 0):+.2f} % | {kls} |")
    for img in images:
        md += ["", f"![{img.stem}]({img.name})", "", f"Command: `{command}`"]
    (out / "sensitivity.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    console.print(f"wrote sensitivity.md, {', '.join(i.name for i in images)} in {out}", highlight=False)
    return 0
