"""`sweep --until-ci W`: documents added in seeded batches until every curve's critical sparsity has
a bootstrap half-width ≤ W (the paper's critical sparsity, on the task metric), or the tasks run out.

Batch k of a task is the same documents for the dense baseline and every point (a seeded shuffle of
the documents outside the first `--limit` sample, cut into batches of `--limit`). Each point's batch
is stored as it finishes (`RunStore.add_docs`, one transaction), the dense reference before the dense
documents, so a kill loses at most the points in flight; a rerun first completes any batch some point
already holds, then goes on deciding from the stored documents only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Callable, Sequence
from typing import Any

from actsparse.evaluate.results import SPARSITY_SEEN, TaskResult
from actsparse.study.store import PointKey, RunStore, atomic_path, reference_path


def document_batches(n_docs: int, first: Sequence[int], size: int, seed: int) -> list[list[int]]:
    """The documents of a task of `n_docs` outside `first`, shuffled with `seed`, in batches of `size`."""
    rest = sorted(set(range(n_docs)) - set(first))
    random.Random(f"until-ci/{seed}").shuffle(rest)
    return [sorted(rest[i : i + size]) for i in range(0, len(rest), size)]


def widest_half_width(store: RunStore, resamples: int, seed: int) -> float:
    """The largest half-width of the headline critical sparsity's interval over the stored curves."""
    from actsparse.analysis import summarize

    summary = summarize(store, resamples=resamples, seed=seed, power=False)
    # a curve that never crosses has a lower bound, not an interval: more documents are needed to place it
    widths = [None if c.get("lower_bound") else c.get("half_width") for c in summary["critical_sparsity"].values()]
    if not widths:
        return math.inf
    return max(math.inf if w is None else float(w) for w in widths)


def merge_sparsity(a: Any, weight_a: float, b: Any, weight_b: float) -> Any:
    """Two runs' `SparsityStats.to_dict()` as one: numbers averaged with the weights (entries seen)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: merge_sparsity(a.get(k), weight_a, b.get(k), weight_b) for k in {**a, **b}}
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        total = weight_a + weight_b
        return (a * weight_a + b * weight_b) / total if total else a
    return a if a is not None else b


def _seen(result: TaskResult) -> float:
    """Entries seen by a run's documents (its document count where documents were not counted)."""
    if result.docs and all(SPARSITY_SEEN in d.metrics for d in result.docs):
        return sum(d.metrics[SPARSITY_SEEN] for d in result.docs)
    return float(len(result.docs))


def until_ci(driver: Any, target: float, advance: Callable[[int], None]) -> list[dict[str, Any]]:
    """Add batches of documents to every stored point until the widest half-width ≤ `target`.

    `driver` is the sweep's `_Driver` (store, config, executor, first sample); returns the history
    [{batch, documents, half_width}] (also kept in the store's meta under 'until_ci')."""
    from actsparse.evaluate import DenseReference
    from actsparse.study.executors import evaluate_point

    config, store = driver.config, driver.store
    first = {t: ids for t, ids in driver.doc_ids.items() if ids is not None}
    tasks = {t.name: t for t in config.resolved_tasks if not isinstance(t, str)}
    size = config.limit
    batches = {t: document_batches(len(tasks[t]), first[t], size, config.seed) for t in first}
    held = store.get_meta("until_ci") or {}
    history: list[dict[str, Any]] = list(held.get("history", []))  # a resumed run keeps its decisions
    k = 0
    while True:
        keys = sorted(store.keys(), key=lambda key: (not key.is_dense, key.target, key.rule, key.value, key.task))
        stored = {key: {d.doc_id for d in store.get(key).docs} for key in keys}  # type: ignore[union-attr]
        batch = {t: batches[t][k] for t in batches if k < len(batches[t])}
        started = any(stored[key] & set(batch.get(key.task, ())) for key in keys)
        if not started:  # decide from what is stored: a batch already begun is finished first
            width = widest_half_width(store, config.resamples, config.seed)
            documents = max(len(stored[PointKey.dense(t)]) for t in first)
            history = [h for h in history if h["batch"] < k] + [
                {"batch": k, "documents": documents, "half_width": width}
            ]
            store.set_meta("until_ci", {"target": target, "history": history})
            if width <= target or not batch:
                return history
        todo = [key for key in keys if key.task in batch and not set(batch[key.task]) <= stored[key]]
        _run_batch(driver, todo, batch, advance, DenseReference, evaluate_point, reference_path)
        k += 1


def _run_batch(driver, keys, batch, advance, DenseReference, evaluate_point, reference_path) -> None:
    """Evaluate `keys` on their task's batch (dense first) and store each as it finishes."""
    config, store = driver.config, driver.store
    for phase in ([k for k in keys if k.is_dense], [k for k in keys if not k.is_dense]):
        if not phase:
            continue
        base = driver.point_context(needs_references=False)
        references = {}
        if not phase[0].is_dense:
            references = {t: DenseReference.load(reference_path(config.out, t)) for t in {k.task for k in phase}}
        context = dataclasses.replace(base, doc_ids={t: batch[t] for t in batch}, references=references)
        for key, outcome in driver.executor.map(evaluate_point, phase, context, advance):
            if outcome.reference is not None:  # the reference first: a stored dense batch always has its own
                path = reference_path(config.out, key.task)
                merged = DenseReference.load(path)
                merged.topk.update(outcome.reference.topk)
                merged.generated.update(outcome.reference.generated)
                tmp = atomic_path(path)
                merged.save(tmp)
                os.replace(tmp, path)
                base.references.pop(key.task, None)  # the driver's copy is stale now
            held = store.get(key)
            sparsity = merge_sparsity(held.sparsity, _seen(held), outcome.result.sparsity, _seen(outcome.result))
            store.add_docs(key, outcome.result.docs, sparsity, outcome.seconds)
            if not driver.executor.reports_documents:
                advance(len(batch[key.task]))
