"""The causal scorer: every document as groups of token ids, each group scored on the packed path where
packing is exact on the model, else on the cached path.

A group is a context and the continuations scored after it (`encode.py`). `packed.py` scores groups as
token trees packed several to a row: no padding, no KV cache, every real token run once. `cached.py` runs
the contexts once and expands their KV cache over the continuations. Generate tasks first generate
greedily (`generate.py`), then are scored teacher-forced on the dense run's generation. Both paths are
exact for causal models, and under `sparsify` too, because rules act on each token's own vector. This
module plans the batches within a token budget (halved on out-of-memory) and turns the scores into
per-document results.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from actsparse.evaluate.bpb import gold_metrics
from actsparse.evaluate.budget import LOGITS, Budget, OutOfMemory, auto_budget, free_memory
from actsparse.evaluate.cached import FORWARD_COST, plan_chunks, score_cached
from actsparse.evaluate.encode import Encoder, Group
from actsparse.evaluate.generate import greedy_generate
from actsparse.evaluate.groups import GroupScore, scored_positions, shared_prefix
from actsparse.evaluate.kl import TOPK, kept_or_kl
from actsparse.evaluate.metrics import GOLD_PROBABILITY, choice_metrics, cut_at_stop, exact_match, gold_probability
from actsparse.evaluate.packed import packing_depth, score_packed, tree_of
from actsparse.evaluate.reference import DenseReference
from actsparse.evaluate.results import SPARSITY_SEEN, SPARSITY_ZEROED, DocResult, TaskResult
from actsparse.sparsity.instrument import active_stats
from actsparse.tasks import Completion, Generation, GoldLikelihood, MultipleChoice, Request, Task, task_docs


@torch.no_grad()
def score_groups(
    model: nn.Module,
    groups: Sequence[Group],
    pad: int,
    *,
    k: int = TOPK,
    reference: Sequence[torch.Tensor] | None = None,
    chunk_tokens: int = 1024,
    packing: bool = True,
    forward_tokens: int | None = None,
    logits: int | None = None,
) -> list[GroupScore]:
    """Log-likelihoods of every continuation of every group.

    `packing`: score groups as packed trees where that is exact on this model, the rest (all when
    False) by the cached path. `reference`: per group, the dense top-k ids [P, k] at which to read
    this run's log-probs. `chunk_tokens`: the most tokens of a cached-path continuation forward;
    `forward_tokens` and `logits`: the most tokens and logits of a packed forward (default
    `packed.FORWARD_TOKENS` and `packed.LOGITS`).
    """
    if reference is not None:
        for group, ref in zip(groups, reference, strict=True):
            if ref.shape[0] != scored_positions(group):
                raise ValueError(f"{scored_positions(group)} scored positions, the dense reference has {ref.shape[0]}")
    depth = packing_depth(model) if packing else 0
    trees = [tree_of(g) for g in groups]
    packed = [i for i, t in enumerate(trees) if depth is None or t.depth <= depth]
    cached = sorted(set(range(len(groups))) - set(packed))
    scores: list[GroupScore | None] = [None] * len(groups)

    def pick(items: Sequence[Any], index: list[int]) -> list[Any]:
        return [items[i] for i in index]

    if packed:
        refs = None if reference is None else pick(reference, packed)
        part = score_packed(model, pick(groups, packed), pick(trees, packed), pad, k, refs, forward_tokens, logits)
        for i, score in zip(packed, part, strict=True):
            scores[i] = score
    if cached:
        refs = None if reference is None else pick(reference, cached)
        part = score_cached(model, pick(groups, cached), pad, k, refs, chunk_tokens)
        for i, score in zip(cached, part, strict=True):
            scores[i] = score
    return scores  # type: ignore[return-value]


def evaluate_causal_task(
    model: nn.Module,
    tokenizer,
    task: str | Task,
    doc_ids: Sequence[int] | None = None,
    *,
    reference: DenseReference | None = None,
    batch_size: int | None = None,
    batch_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
    packing: bool = True,
) -> tuple[TaskResult, DenseReference]:
    """`evaluate_task` for causal LMs. `batch_tokens`: tokens of one forward (default `budget.auto_budget`:
    from free memory on CUDA); on out-of-memory it is halved and the batch re-planned, so no document is
    lost. `batch_size`: the most documents scored together (None: no cap). `packing`: score as packed
    trees where exact."""
    task, ids = task_docs(task, doc_ids)
    if reference is not None:
        reference.check(task.name, ids)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if batch_tokens is not None and batch_tokens < 1:
        raise ValueError(f"batch_tokens must be at least 1, got {batch_tokens}")
    budget = Budget(batch_tokens, LOGITS) if batch_tokens else auto_budget(model)
    encoder = Encoder(tokenizer)
    keep = reference if reference is not None else DenseReference(task.name, TOPK)
    requests = {d: task.request(d) for d in ids}
    encoded = {d: _encode(encoder, requests[d]) for d in ids}
    results: dict[int, DocResult] = {}
    order = sorted(ids, key=lambda d: -_width(encoded[d]))  # batches of similar length: little padding
    steps = max((r.max_tokens for r in requests.values() if isinstance(r, Generation)), default=0)
    packed = packing and not steps and packing_depth(model) != 0
    while order:  # plan the batches, score them; on out-of-memory halve the budget and re-plan the rest
        chunks = _plan_batches(order, encoded, budget, batch_size, packed, steps)
        try:
            for start, stop in chunks:
                batch = order[start:stop]
                saved = [(stats, stats.snapshot()) for stats in active_stats(model)]
                scored = _score_batch(
                    model, tokenizer, task, batch, requests, encoded, reference, keep, packing, budget
                )
                for doc_id, result in scored:
                    results[doc_id] = result
                if progress is not None:
                    progress(len(batch))
            order = []
        except OutOfMemory:  # the failed batch's layers may have counted some tokens: forget them
            for stats, counts in saved:
                stats.restore(counts)
            order = [d for d in order if d not in results]
            free_memory(model)
            budget = budget.halved()
    docs = [results[d] for d in ids]
    return TaskResult(task.name, task.split, task.metric, docs), keep


PACKED_FORWARDS = 4
"""Forwards' worth of tokens in one batch of packed documents: enough trees for the packing to fill rows."""


def _plan_batches(
    order: Sequence[int], encoded: dict[int, Any], budget: Budget, batch_size: int | None, packed: bool, steps: int
) -> list[tuple[int, int]]:
    """[start, stop) batches of `order` (sorted by decreasing width). Packed: documents whose tokens fill
    PACKED_FORWARDS forwards of the budget; cached: padded rows (and generated tokens) within the budget,
    cut where padding would cost more than another forward."""
    if packed:
        chunks: list[tuple[int, int]] = []
        start, tokens = 0, 0
        for i, d in enumerate(order):
            size = _tokens(encoded[d])
            if i > start and (tokens + size > PACKED_FORWARDS * budget.tokens or i - start == (batch_size or i + 1)):
                chunks.append((start, i))
                start, tokens = i, 0
            tokens += size
        return chunks + ([(start, len(order))] if order else [])
    widths = [_width(encoded[d]) + steps for d in order]
    return plan_chunks(widths, budget.tokens, FORWARD_COST * (1 + steps), max_rows=batch_size)


def _tokens(encoded: list[Group] | list[int]) -> int:
    """Tokens of a document as packed trees (every context and continuation token once)."""
    if encoded and isinstance(encoded[0], Group):
        return sum(len(g.context) + sum(len(c) for c in g.continuations) for g in encoded)  # type: ignore[union-attr]
    return len(encoded)


def _encode(encoder: Encoder, request: Request) -> list[Group] | list[int]:
    """Groups of token ids (multiple choice, completion) or the prompt's ids (generation)."""
    if isinstance(request, MultipleChoice):
        return encoder.groups(request.pairs())
    if isinstance(request, Completion):
        return encoder.groups([(request.context, request.target)])
    if isinstance(request, GoldLikelihood):
        return encoder.groups([(request.context, request.continuation)])
    return encoder.encode(request.prompt)


def _width(encoded: list[Group] | list[int]) -> int:
    """Tokens of the longest first forward of a document (context and shared prefix)."""
    if encoded and isinstance(encoded[0], Group):
        return max(len(g.context) + shared_prefix(g.continuations) for g in encoded)  # type: ignore[union-attr]
    return len(encoded)


def _score_batch(
    model: nn.Module,
    tokenizer,
    task: Task,
    batch: Sequence[int],
    requests: dict[int, Request],
    encoded: dict[int, Any],
    reference: DenseReference | None,
    keep: DenseReference,
    packing: bool,
    budget: Budget | None = None,
) -> list[tuple[int, DocResult]]:
    pad = Encoder(tokenizer).pad
    generations: dict[int, list[int]] = {}
    gen_docs = [d for d in batch if isinstance(requests[d], Generation)]
    if gen_docs:
        first: Generation = requests[gen_docs[0]]  # type: ignore[assignment]
        outputs = greedy_generate(model, tokenizer, [encoded[d] for d in gen_docs], first.until, first.max_tokens, pad)
        generations = dict(zip(gen_docs, outputs, strict=True))
    doc_groups: dict[int, list[Group]] = {}
    for d in batch:
        if isinstance(requests[d], Generation):  # teacher-forced on the dense generation, for KL
            forced = reference.generated[d] if reference is not None else generations[d]
            doc_groups[d] = [Group(encoded[d], [forced])]
        else:
            doc_groups[d] = encoded[d]
    flat = [g for d in batch for g in doc_groups[d]]
    refs = None
    if reference is not None:
        refs = []
        for d in batch:
            sizes = [scored_positions(g) for g in doc_groups[d]]
            reference.check_positions(d, sum(sizes))
            refs.extend(reference.topk[d][0].split(sizes))
    budget = budget or Budget()
    scores = score_groups(
        model,
        flat,
        pad,
        k=keep.k,
        reference=refs,
        packing=packing,
        chunk_tokens=max(1, budget.tokens // 4),
        forward_tokens=budget.tokens,
        logits=budget.logits,
    )
    out: list[tuple[int, DocResult]] = []
    at = 0
    for d in batch:
        mine = scores[at : at + len(doc_groups[d])]
        at += len(doc_groups[d])
        lls = [ll for s in mine for ll in s.lls]
        request = requests[d]
        if isinstance(request, MultipleChoice):
            metrics, pred, pred_norm = choice_metrics(lls, request.choices, request.gold)
            answer = str(pred_norm if task.metric == "acc_norm" else pred)
            metrics[GOLD_PROBABILITY] = gold_probability(lls, request.choices, request.gold, task.metric == "acc_norm")
        elif isinstance(request, Completion):
            metrics = {"acc": float(mine[0].greedy[0]), GOLD_PROBABILITY: math.exp(mine[0].lls[0])}
            answer = tokenizer.decode(mine[0].argmax[0])
        elif isinstance(request, GoldLikelihood):
            metrics, answer = gold_metrics(lls[0], request.continuation), ""
        else:
            text = cut_at_stop(tokenizer.decode(generations[d], skip_special_tokens=True), request.until)
            metrics = request.check(text) if request.check else {"exact_match": exact_match(text, request.answers)}
            answer = text
            if reference is None:
                keep.generated[d] = generations[d]
        counts = [s.counts for s in mine]
        if not isinstance(request, Generation) and all(c is not None for c in counts):
            metrics[SPARSITY_ZEROED] = float(sum(c[0] for c in counts if c is not None))
            metrics[SPARSITY_SEEN] = float(sum(c[1] for c in counts if c is not None))
        ids, logp = torch.cat([s.ids for s in mine]), torch.cat([s.logp for s in mine])
        kept, kl, positions = kept_or_kl(ids, logp, d, reference)
        if kept is not None:
            keep.topk[d] = kept
        out.append((d, DocResult(d, metrics[task.metric], metrics, answer, kl, positions)))
    return out
