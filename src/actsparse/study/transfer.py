"""Do operating points chosen on some tasks hold on others? (`actsparse transfer`)

1. A sweep of each target on the source tasks (`OUT/source`, an ordinary resumable sweep) gives its
   critical sparsity and the p at which the source tasks' normalised performance crosses 99 %
   (linear interpolation between the bracketing points, as for the critical sparsity itself).
2. That fixes the operating point of each target: `top_p` at that p, or (`--rule threshold`)
   per-layer thresholds calibrated on the source tasks' prompts to reach the critical sparsity.
3. The fixed point runs on every source and destination task (`OUT/points`, resumable), densely and
   sparsely on the same documents, recording each real token's sparsity (`OUT/tokens`).
4. Retention per task: sparse / dense score (bpb tasks: dense_bpb / sparse_bpb), with a 95 %
   paired-bootstrap interval over documents; `transfer.json` holds it, the report draws it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actsparse.analysis import THRESHOLD
from actsparse.sparsity.spec import SparsitySpec
from actsparse.study.store import PointKey, RunStore, atomic_path, check_writable

RULES = ("top_p", "threshold")


@dataclass
class TransferConfig:
    """Everything `run_transfer` needs; tasks are names (or `Task` objects in tests)."""

    model: str
    sources: Sequence[Any]
    destinations: Sequence[Any]
    targets: Sequence[str] = ("input", "intermediate")
    values: Sequence[float] = (0.99, 0.98, 0.97, 0.95, 0.9, 0.85)
    rule: str = "top_p"  # the fixed point: 'top_p' at the critical p, or calibrated 'threshold's
    limit: int | None = 60  # documents per source task
    dest_limit: int | None = 30  # documents per destination task
    seed: int = 0
    batch_size: int = 16
    resamples: int = 1000
    out: Path = Path("runs/transfer")
    command: str = ""
    report_only: bool = False  # evaluate nothing: report the points stored so far
    device: str = "auto"  # where the source sweep and the transfer points run (`models.placement`)
    dtype: str = "auto"  # their precision: the source sweep's, bound to its folder
    _tasks: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    def validate(self) -> None:
        """Every setting checked, task names resolved, before any model work (ValueError)."""
        from actsparse.study.sweep import SweepConfig

        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r} for transfer; choose from {', '.join(RULES)}")
        if not self.sources or not self.destinations:
            raise ValueError("transfer needs source tasks (--from) and destination tasks (--to)")
        for limit in (self.limit, self.dest_limit):
            if limit is not None and limit < 1:
                raise ValueError(f"a document limit must be at least 1 (or 'all'), got {limit}")
        if self.resamples < 10:
            raise ValueError(f"--resamples must be at least 10, got {self.resamples}")
        self.source_sweep().validate()  # targets, values, batch size, source task names
        tasks = {}
        for task in [*self.sources, *self.destinations]:
            resolved = SweepConfig(tasks=[task])._resolve(task)
            tasks[_name(resolved)] = resolved
        overlap = {_name(t) for t in self.sources} & {_name(t) for t in self.destinations}
        if overlap:
            raise ValueError(f"a task is both a source and a destination: {', '.join(sorted(overlap))}")
        self._tasks = tasks

    def source_sweep(self) -> Any:
        from actsparse.study.sweep import SweepConfig

        return SweepConfig(
            model=self.model,
            targets=list(self.targets),
            rules=["top_p"],
            values=list(self.values),
            tasks=list(self.sources),
            limit=self.limit,
            seed=self.seed,
            out=self.out / "source",
            batch_size=self.batch_size,
            resamples=self.resamples,
            device=self.device,
            dtype=self.dtype,
        )

    @property
    def tasks(self) -> dict[str, Any]:
        if not self._tasks:
            self.validate()
        return self._tasks


def _name(task: Any) -> str:
    return task if isinstance(task, str) else task.name


@dataclass(frozen=True)
class OperatingPoint:
    """A target's point fixed on the source tasks: the p where they cross 99 % and the sparsity there."""

    target: str
    p: float  # interpolated p at the crossing (the smallest p tried for a lower bound)
    sparsity: float  # critical sparsity on the source tasks (interpolated)
    lower_bound: bool  # the source curve never crossed: the point is the sparsest one tried
    bracket: tuple[float, float]  # the two p values the crossing lies between


def operating_point(summary: dict[str, Any], target: str, threshold: float = THRESHOLD) -> OperatingPoint:
    """The crossing of one target's top_p curve in a sweep summary, in p and in achieved sparsity."""
    pts = [
        p
        for p in summary["points"]
        if p["target"] == target and p["rule"] == "top_p" and p.get("complete") and p["sparsity"] is not None
    ]
    if not pts:
        raise ValueError(f"the source sweep has no complete top_p point for target {target!r}")
    pts.sort(key=lambda p: p["sparsity"])
    xs = [0.0] + [p["sparsity"] for p in pts]
    ps = [1.0] + [p["value"] for p in pts]
    ys = [1.0] + [p["normalized"] if p["normalized"] is not None else math.nan for p in pts]
    for i in range(1, len(xs)):
        if ys[i] < threshold:  # NaN never crosses
            frac = (ys[i - 1] - threshold) / (ys[i - 1] - ys[i]) if ys[i - 1] > ys[i] else 0.0
            frac = min(max(frac, 0.0), 1.0)
            p = ps[i - 1] + frac * (ps[i] - ps[i - 1])
            s = xs[i - 1] + frac * (xs[i] - xs[i - 1])
            return OperatingPoint(target, round(p, 4), s, False, (ps[i - 1], ps[i]))
    return OperatingPoint(target, ps[-1], xs[-1], True, (ps[-1], ps[-1]))


def prompt_batches(tokenizer: Any, tasks: dict[str, Any], doc_ids: dict[str, list[int]]) -> list[dict[str, Any]]:
    """One calibration batch per source document: the text the model reads when scoring it (context
    and gold continuation, or the prompt of a generation)."""
    import torch

    from actsparse.tasks import Completion, Generation, GoldLikelihood, MultipleChoice

    batches = []
    for name, ids in doc_ids.items():
        for d in ids:
            r = tasks[name].request(d)
            if isinstance(r, MultipleChoice):
                context, continuation = r.pairs()[r.gold]
                text = context + continuation
            elif isinstance(r, Completion):
                text = r.context + r.target
            elif isinstance(r, GoldLikelihood):
                text = r.context + r.continuation
            else:
                assert isinstance(r, Generation)
                text = r.prompt
            ids_ = torch.tensor([tokenizer.encode(text)], dtype=torch.long)
            batches.append({"input_ids": ids_, "attention_mask": torch.ones_like(ids_)})
    return batches


def _spec(point: OperatingPoint, rule: str, thresholds: Any) -> tuple[SparsitySpec, float]:
    """The fixed spec of a target and the value that keys it in the store (p, or the sparsity calibrated)."""
    if rule == "top_p":
        return SparsitySpec(point.target, "top_p", point.p), point.p
    return SparsitySpec(point.target, "threshold", thresholds), round(point.sparsity, 6)


def run_transfer(
    config: TransferConfig,
    model: Any = None,
    tokenizer: Any = None,
    show_progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Run (or resume) a transfer study into `config.out`; return what `transfer.json` holds."""
    import torch

    from actsparse.evaluate import DenseReference, evaluate_task
    from actsparse.study.structure import record_tokens, retention
    from actsparse.study.sweep import run_sweep
    from actsparse.tasks import select_docs

    config.validate()
    check_writable(config.out)
    tasks = config.tasks
    sources = [_name(t) for t in config.sources]
    dests = [_name(t) for t in config.destinations]
    doc_ids = {
        t: select_docs(tasks[t], config.limit if t in sources else config.dest_limit, config.seed) for t in tasks
    }
    with RunStore.open(config.out / "points") as store:  # settings bound before any model work
        for name, setting in (("model", config.model), ("seed", config.seed), ("rule", config.rule)):
            store.bind(name, setting)
        for t, ids in doc_ids.items():
            store.bind(f"docs/{t}", ids)
    if config.report_only:
        from actsparse.analysis import write_summary

        previous = config.out / "transfer.json"
        if previous.exists():  # the figures name the command that evaluated the points, then this one
            first = json.loads(previous.read_text()).get("command", "").split(" ; then ")[0]
            config.command = f"{first} ; then {config.command}" if first else config.command

        summary = write_summary(config.out / "source", resamples=config.resamples, seed=config.seed)
    else:
        source = config.source_sweep()
        where = source.placement  # the transfer points run in the source sweep's device and precision
        if model is None:
            from actsparse.models.loading import load_model

            model, tokenizer = load_model(config.model, where.dtype, where.device)
        else:
            from actsparse.study.sweep import _placed

            model, tokenizer = _placed((model, tokenizer), where)
        log(f"source sweep on {', '.join(sources)} → {config.out / 'source'}")
        summary = run_sweep(source, model, tokenizer, show_progress=show_progress)
    points = {t: operating_point(summary, t) for t in config.targets}
    specs: dict[str, tuple[SparsitySpec, float]] = {}
    for target, point in points.items():
        thresholds = None
        if config.rule == "threshold":
            from actsparse.speed.calibrate import calibrate, save_thresholds

            path = config.out / f"thresholds_{target}.json"
            if not path.exists() and config.report_only:
                raise ValueError(f"{path} is missing: run the transfer without --report-only first")
            if not path.exists():
                batches = prompt_batches(tokenizer, tasks, {t: doc_ids[t] for t in sources})
                found = calibrate(model, batches, target, point.sparsity)
                tmp = atomic_path(path)
                save_thresholds(tmp, found, config.model, target, point.sparsity)
                os.replace(tmp, path)
            thresholds = str(path)
        specs[target] = _spec(point, config.rule, thresholds)
        log(f"{target}: fixed at {specs[target][0].label} (source critical sparsity {point.sparsity:.1%})")

    tokens_dir = config.out / "tokens"
    tokens_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, Any] = {}
    out: dict[str, Any] = {}
    with RunStore.open(config.out / "points") as store:
        for t in [*sources, *dests]:
            dense = store.get(PointKey.dense(t))
            ref_path = config.out / "points" / "dense" / f"{t}.ref"
            if config.report_only and (dense is None or not ref_path.exists()):
                continue
            if dense is None or not ref_path.exists():
                log(f"dense {t} ({len(doc_ids[t])} documents)")
                with torch.no_grad():
                    result, reference = evaluate_task(
                        model, tokenizer, tasks[t], doc_ids[t], batch_size=config.batch_size
                    )
                ref_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = atomic_path(ref_path)
                reference.save(tmp)
                os.replace(tmp, ref_path)
                store.put(PointKey.dense(t), result)
                dense = store.get(PointKey.dense(t))
            assert dense is not None
            for target, (spec, value) in specs.items():
                key = PointKey(target, config.rule, value, t)
                sparse = store.get(key)
                if sparse is None and config.report_only:
                    continue
                if sparse is None:
                    log(f"{spec.label} on {t}")
                    reference = DenseReference.load(ref_path)
                    with torch.no_grad(), record_tokens(model, spec) as (stats, sink):
                        sparse, _ = evaluate_task(
                            model, tokenizer, tasks[t], doc_ids[t], reference=reference, batch_size=config.batch_size
                        )
                    sparse.sparsity = stats.to_dict()
                    tmp = atomic_path(tokens_dir / f"{target}__{t}.npy")
                    with open(tmp, "wb") as f:
                        np.save(f, sink.per_token().astype(np.float32))
                    os.replace(tmp, tokens_dir / f"{target}__{t}.npy")
                    store.put(key, sparse)
                    sparse = store.get(key)
                assert sparse is not None
                r = retention(dense, sparse, config.resamples, config.seed)
                stats_all = sparse.sparsity.get("all", {})
                records.setdefault(target, {})[t] = {
                    **asdict(r),
                    "role": "source" if t in sources else "destination",
                    "sparsity": stats_all.get("sparsity"),
                    "sparsity_per_layer": stats_all.get("per_layer", {}),
                    "metric": dense.metric,
                    "split": dense.split,
                }
            out = _record(config, sources, dests, doc_ids, points, specs, records, summary)  # after each task
    if not records:
        raise ValueError(f"{config.out / 'points'} holds no evaluated point yet")
    return out


def _record(
    config: TransferConfig,
    sources: list[str],
    dests: list[str],
    doc_ids: dict[str, list[int]],
    points: dict[str, OperatingPoint],
    specs: dict[str, tuple[SparsitySpec, float]],
    records: dict[str, Any],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Write OUT/transfer.json with the tasks done so far (complete: every task of both sets)."""
    done = {t for rows in records.values() for t in rows}
    out = {
        "model": config.model,
        "command": config.command,
        "rule": config.rule,
        "sources": sources,
        "destinations": dests,
        "complete": done == set(sources) | set(dests),
        "n_docs": {t: len(ids) for t, ids in doc_ids.items()},
        "source_values": list(config.values),
        "operating_points": {t: asdict(p) for t, p in points.items()},
        "specs": {t: s.label for t, (s, _) in specs.items()},
        "retention": records,
        "bootstrap": {"resamples": config.resamples, "seed": config.seed, "level": 0.95, "paired": True},
        "source_critical": summary.get("critical_sparsity", {}),
    }
    from actsparse.analysis import to_json

    out = to_json(out)
    path = config.out / "transfer.json"
    tmp = atomic_path(path)
    tmp.write_text(json.dumps(out, indent=2, allow_nan=False))
    os.replace(tmp, path)
    return out
