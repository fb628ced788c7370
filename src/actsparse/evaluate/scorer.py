"""The fast scorer: multiple choice as token trees packed into rows, one forward per batch.

Every document becomes groups of token ids: a context and the continuations scored after it. A group is
a tree (packing.py): the context, extended by the prefix its continuations share, then each continuation's
own tokens as a branch that sees the trunk and itself only. Trees are packed several to a row and rows
batched into forwards with a 4D mask and explicit positions: no padding between documents, every real
token runs once, no KV cache, and the vocabulary projection runs only at scored positions.
Models where a custom mask is not exact (attention other than eager/sdpa, chunked or bidirectional
attention, trees deeper than a sliding window) take the cached path: one forward runs the contexts
(left-padded), the KV cache is then expanded over the continuations' own tokens, in chunks of similar
length. Greedy generation always takes it.
Both are exact for causal models, and under `sparsify` too, because rules act on each token's own vector.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from actsparse.evaluate.bpb import gold_metrics
from actsparse.evaluate.budget import CPU_TOKENS, Budget, OutOfMemory, auto_budget, free_memory
from actsparse.evaluate.encode import Encoder, Group
from actsparse.evaluate.metrics import (
    GOLD_PROBABILITY,
    choice_metrics,
    cut_at_stop,
    exact_match,
    gold_probability,
    topk_kl,
)
from actsparse.evaluate.packing import PackedRows, Tree, make_tree, pack, plan_rows
from actsparse.evaluate.reference import DenseReference
from actsparse.evaluate.results import SPARSITY_SEEN, SPARSITY_ZEROED, DocResult, TaskResult
from actsparse.instrument import active_stats, counted_as_prefill, set_real_tokens
from actsparse.stats import TokenCounts
from actsparse.tasks import Completion, Generation, GoldLikelihood, MultipleChoice, Request, Task, get_task, select_docs

TOPK = 32
"""Dense log-probs kept per scored position for KL (the rest of the vocabulary is one bucket)."""


@dataclass
class GroupScore:
    """Per continuation: log-likelihood, all-greedy flag, greedy tokens. Per distinct scored position
    (context end and shared prefix first, then each continuation's own positions): `ids` and `logp`,
    the top-k log-probs (dense run) or the log-probs at the reference's ids (sparse run), [P, k]."""

    lls: list[float]
    greedy: list[bool]
    argmax: list[list[int]]
    ids: torch.Tensor
    logp: torch.Tensor
    counts: list[int] | None = None  # [zeroed, seen] of the group's tokens under `sparsify`, when counted


def _left_pad(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def shared_prefix(continuations: Sequence[Sequence[int]]) -> int:
    """Tokens every continuation starts with, leaving each at least one token of its own."""
    if not continuations or not all(continuations):
        return 0
    limit = min(len(c) for c in continuations) - 1
    n = 0
    while n < limit and all(c[n] == continuations[0][n] for c in continuations):
        n += 1
    return n


FORWARD_COST = 64
"""A forward's fixed cost (streaming the weights, Python) in tokens of compute, for `plan_chunks`."""


def plan_chunks(
    widths: Sequence[int], budget: int, overhead: int = FORWARD_COST, max_rows: int | None = None
) -> list[tuple[int, int]]:
    """Split rows sorted by decreasing width into [start, stop) chunks padded to their first row:
    the fewest padded tokens plus `overhead` per forward, each chunk within `budget` tokens and `max_rows`."""
    n = len(widths)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of rows [0, j)
    cut = [0] * (n + 1)
    for stop in range(1, n + 1):
        for start in range(stop - 1, -1, -1):
            if stop - start > 1 and ((stop - start) * widths[start] > budget or stop - start > (max_rows or n)):
                break
            cost = best[start] + overhead + (stop - start) * widths[start]
            if cost < best[stop]:
                best[stop], cut[stop] = cost, start
    chunks, stop = [], n
    while stop > 0:
        chunks.append((cut[stop], stop))
        stop = cut[stop]
    return chunks[::-1]


def _read(logits: torch.Tensor, targets: list[list[int]], k: int, ref_ids: torch.Tensor | None):
    """At each position: log-probs of its candidate targets, its argmax, and the top-k summary."""
    logp = logits.float().log_softmax(-1)
    greedy = logp.argmax(-1).tolist()
    lls = [[float(logp[j, t]) for t in ts] for j, ts in enumerate(targets)]
    if ref_ids is None:
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        return lls, greedy, (ids.to(torch.int32).cpu(), values.cpu())
    return lls, greedy, (ref_ids, logp.gather(-1, ref_ids.to(logp.device).long()).cpu())


PACKED_ATTENTION = ("eager", "sdpa")
FORWARD_TOKENS = CPU_TOKENS
"""Tokens (padding included) of one packed forward, unless a budget says otherwise."""
LOGITS = 1 << 26
"""Logits (floats) of one packed forward: 256 MB, 1365 scored positions of a 49k vocabulary."""


def packing_depth(model: nn.Module) -> int | None:
    """The deepest tree that packing scores exactly on `model`: None for any, 0 for none (attention other
    than eager/sdpa, bidirectional or chunked attention, another layer type, a multimodal wrapper), else
    the sliding window, which the tree mask does not encode (a tree within it never reaches its edge)."""
    config = getattr(model, "config", None)
    if config is None or config.get_text_config() is not config:
        return 0
    if getattr(config, "_attn_implementation", None) not in PACKED_ATTENTION or not getattr(config, "is_causal", True):
        return 0
    if getattr(config, "use_bidirectional_attention", False) or getattr(config, "attention_chunk_size", None):
        return 0
    types = getattr(config, "layer_types", None)
    if types is not None and not set(types) <= {"full_attention", "sliding_attention"}:
        return 0
    window = getattr(config, "sliding_window", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


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
    FORWARD_TOKENS and LOGITS).
    """
    if reference is not None:
        for group, ref in zip(groups, reference, strict=True):
            if ref.shape[0] != scored_positions(group):
                raise ValueError(f"{scored_positions(group)} scored positions, the dense reference has {ref.shape[0]}")
    depth = packing_depth(model) if packing else 0
    trees = [_tree(g) for g in groups]
    packed = [i for i, t in enumerate(trees) if depth is None or t.depth <= depth]
    cached = sorted(set(range(len(groups))) - set(packed))
    scores: list[GroupScore | None] = [None] * len(groups)

    def pick(items: Sequence[Any], index: list[int]) -> list[Any]:
        return [items[i] for i in index]

    if packed:
        refs = None if reference is None else pick(reference, packed)
        budget = Budget(forward_tokens or FORWARD_TOKENS, logits or LOGITS)
        part = _score_packed(model, pick(groups, packed), pick(trees, packed), pad, k, refs, budget)
        for i, score in zip(packed, part, strict=True):
            scores[i] = score
    if cached:
        refs = None if reference is None else pick(reference, cached)
        part = _score_cached(model, pick(groups, cached), pad, k, refs, chunk_tokens)
        for i, score in zip(cached, part, strict=True):
            scores[i] = score
    return scores  # type: ignore[return-value]


def _tree(group: Group) -> Tree:
    """The group as a tree: context and shared prefix, then each continuation's own tokens but its last."""
    n = shared_prefix(group.continuations)
    return make_tree(group.context + group.continuations[0][:n], [c[n:-1] for c in group.continuations if c[n:-1]])


@contextmanager
def _real_tokens(model: nn.Module, real: torch.Tensor) -> Iterator[None]:
    """Tell running `sparsify` blocks which tokens are real: their model pre-hook, which runs before
    this one, reads real tokens from a 2D mask and sees the packed forward's 4D mask instead."""
    handle = model.register_forward_pre_hook(lambda module, args: set_real_tokens(model, real))
    try:
        yield
    finally:
        handle.remove()


def _score_packed(
    model: nn.Module,
    groups: Sequence[Group],
    trees: Sequence[Tree],
    pad: int,
    k: int,
    reference: Sequence[torch.Tensor] | None,
    budget: Budget,
) -> list[GroupScore]:
    """Score groups as trees packed into rows, the rows batched into forwards within the budgets."""
    device = next(model.parameters()).device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    most = max(1, budget.logits // int(getattr(model.config, "vocab_size", 1)))  # scored positions a forward
    width, rows = plan_rows([len(t) for t in trees])
    sizes = [scored_positions(g) for g in groups]
    forwards: list[list[list[int]]] = []
    scored = 0
    for row in rows:
        size = sum(sizes[i] for i in row)
        if not forwards or (len(forwards[-1]) + 1) * width > budget.tokens or scored + size > most:
            forwards.append([])
            scored = 0
        forwards[-1].append(row)
        scored += size
    scores: list[GroupScore | None] = [None] * len(groups)
    for forward in forwards:
        batch = pack(trees, forward, pad, dtype, device)
        with _token_counts(model) as counts:
            read = list(_read_packed(model, groups, batch, k, reference))
        table = _table(counts, batch.real.shape)
        for i, score in read:
            if table is not None:
                r, at = batch.where[i]
                score.counts = table[r, at : at + len(trees[i])].sum(0).tolist()
            scores[i] = score
    return scores  # type: ignore[return-value]


@contextmanager
def _token_counts(model: nn.Module) -> Iterator[TokenCounts | None]:
    """Per-token sparsity counts of the forwards run in the block, when one `sparsify` block is running."""
    running = active_stats(model)
    if len(running) != 1:
        yield None
        return
    counts = running[0].per_token = TokenCounts()
    try:
        yield counts
    finally:
        running[0].per_token = None


def _table(counts: TokenCounts | None, shape: torch.Size) -> torch.Tensor | None:
    """The block's per-token [zeroed, seen] as [B, T, 2] for a forward of `shape` [B, T], or None."""
    table = None if counts is None else counts.table()
    if table is None or table.shape[0] != shape[0] * shape[1]:
        return None
    return table.reshape(shape[0], shape[1], 2)


def _add_counts(total: list[int] | None, rows: torch.Tensor) -> list[int]:
    add = rows.reshape(-1, 2).sum(0).tolist()
    return add if total is None else [total[0] + add[0], total[1] + add[1]]


def _read_packed(
    model: nn.Module, groups: Sequence[Group], batch: PackedRows, k: int, reference: Sequence[torch.Tensor] | None
) -> Iterator[tuple[int, GroupScore]]:
    """One packed forward, then every group's reads at its scored positions."""
    keep = torch.zeros(batch.real.shape, dtype=torch.bool)
    first_column: dict[int, tuple[int, int]] = {}  # group → its first scored position: row, column
    for i, (r, at) in batch.where.items():
        column = at + len(groups[i].context) - 1  # the context's last token, the shared prefix, the branches
        keep[r, column : column + scored_positions(groups[i])] = True
        first_column[i] = (r, column)
    mask_slicing = _masked_logits_to_keep()
    with _real_tokens(model, batch.real):
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=keep.to(batch.real.device) if mask_slicing else 0,
        ).logits
    if logits.dim() == 3:  # a transformers without boolean `logits_to_keep`: every position was projected
        logits = logits[keep.to(logits.device)]
    logp = logits.float()
    for start in range(0, logp.shape[0], 256):  # in place, a slice at a time: one [N, V] tensor at most
        logp[start : start + 256] = logp[start : start + 256].log_softmax(-1)
    rank = (keep.flatten().cumsum(0) - 1).tolist()
    first = {i: rank[r * keep.shape[1] + c] for i, (r, c) in first_column.items()}  # its first row of `logp`
    rows: list[int] = []
    tokens: list[int] = []
    for i, at in first.items():
        for j, scored in enumerate(_targets(groups[i])):
            rows += [at + j] * len(scored)
            tokens += scored
    lls = logp[torch.tensor(rows, device=logp.device), torch.tensor(tokens, device=logp.device)].tolist()
    greedy = logp.argmax(-1).tolist()
    if reference is None:
        values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
        ids, values = ids.to(torch.int32).cpu(), values.cpu()
    else:
        ids = torch.empty((logp.shape[0], reference[0].shape[1]), dtype=torch.int32)
        for i, at in first.items():
            ids[at : at + reference[i].shape[0]] = reference[i]
        values = logp.gather(-1, ids.to(logp.device).long()).cpu()
    read = 0
    for i, at in first.items():
        group = groups[i]
        n, size = shared_prefix(group.continuations), scored_positions(group)
        per_row = []
        for scored in _targets(group):
            per_row.append(lls[read : read + len(scored)])
            read += len(scored)
        reads = {0: (per_row[: n + 1], greedy[at : at + n + 1])}
        own = n + 1  # a continuation's own positions follow the shared ones, in order
        for c, cont in enumerate(group.continuations):
            m = len(cont) - n - 1
            if m > 0:
                reads[1 + c] = (per_row[own : own + m], greedy[at + own : at + own + m])
                own += m
        yield i, _combine(group, n, reads, ids[at : at + size], values[at : at + size])


@functools.cache
def _masked_logits_to_keep() -> bool:
    """Whether this transformers slices hidden states by a boolean [B, T] `logits_to_keep` (5.2x and later)."""
    from transformers import modeling_utils

    return hasattr(modeling_utils, "slice_logits_to_keep")


def _targets(group: Group) -> Iterator[list[int]]:
    """The token ids scored at each scored position of a group, in order: the shared prefix's, the
    continuations' first own tokens (one position for all), then each continuation's other own tokens."""
    n = shared_prefix(group.continuations)
    yield from ([t] for t in group.continuations[0][:n])
    yield [c[n] for c in group.continuations if c]
    for cont in group.continuations:
        yield from ([t] for t in cont[n + 1 :])


def _score_cached(
    model: nn.Module,
    groups: Sequence[Group],
    pad: int,
    k: int,
    reference: Sequence[torch.Tensor] | None,
    chunk_tokens: int,
) -> list[GroupScore]:
    """One forward runs the contexts, each extended by the prefix its continuations share; the KV
    cache is then expanded over the continuations' own tokens, which run in chunks of similar length."""
    device = next(model.parameters()).device
    prefixes = [shared_prefix(g.continuations) for g in groups]
    owns = [[c[n:] for c in g.continuations] for g, n in zip(groups, prefixes, strict=True)]
    # scored positions of a group: context end and shared prefix (order 0), then continuation i (1 + i)
    offsets = []
    for n, own in zip(prefixes, owns, strict=True):
        at, off = n + 1, {0: 0}
        for i, o in enumerate(own):
            off[1 + i] = at
            at += max(len(o) - 1, 0)
        offsets.append(off)

    def ref_slice(b: int, order: int, size: int) -> torch.Tensor | None:
        if reference is None:
            return None
        start = offsets[b][order]
        return reference[b][start : start + size]

    contexts = [g.context + g.continuations[0][:n] for g, n in zip(groups, prefixes, strict=True)]
    ids, mask = _left_pad(contexts, pad, device)
    # the vocabulary projection runs only at scored positions: each row's last n + 1 (a flat [N, V])
    width = ids.shape[1]
    scored = torch.arange(width, device=device) >= width - 1 - torch.tensor(prefixes, device=device)[:, None]
    with _token_counts(model) as counts:
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True, logits_to_keep=scored
        )
    table = _table(counts, ids.shape)
    group_counts: list[list[int] | None] = [None] * len(groups)
    counted = table is not None
    if table is not None:
        group_counts = [_add_counts(None, table[b]) for b in range(len(groups))]
    cache = out.cache
    reads: list[dict[int, tuple]] = []
    at = 0
    for b, (g, n) in enumerate(zip(groups, prefixes, strict=True)):
        targets = [[t] for t in g.continuations[0][:n]] + [[c[n] for c in g.continuations if c]]
        reads.append({0: _read(out.logits[at : at + n + 1], targets, k, ref_slice(b, 0, n + 1))})
        at += n + 1
    del out
    rows = [(b, i, o) for b, conts in enumerate(owns) for i, o in enumerate(conts) if len(o) > 1]
    rows.sort(key=lambda r: -len(r[2]))
    lengths = mask.sum(-1)
    for start, stop in plan_chunks([len(r[2]) - 1 for r in rows], chunk_tokens):
        chunk, width = rows[start:stop], len(rows[start][2]) - 1
        last = stop == len(rows)
        index = torch.tensor([b for b, _, _ in chunk], device=device)
        part = cache if last else copy.deepcopy(cache)
        part.batch_select_indices(index)
        cids = torch.full((len(chunk), width), pad, dtype=torch.long)
        cmask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, _, tokens) in enumerate(chunk):
            cids[r, : len(tokens) - 1] = torch.tensor(tokens[:-1], dtype=torch.long)
            cmask[r, : len(tokens) - 1] = 1
        cids, cmask = cids.to(device), cmask.to(device)
        # one-token chunks too are counted as prefill: they are scored text, not generated
        with counted_as_prefill(model), _token_counts(model) as counts:
            logits = model(
                input_ids=cids,
                attention_mask=torch.cat([mask[index], cmask], dim=1),
                position_ids=lengths[index, None] + torch.arange(width, device=device),
                cache=part,
                use_cache=True,
                logits_to_keep=cmask.bool(),  # real positions only, flat [N, V]
            ).logits
        table = _table(counts, cids.shape)
        counted = counted and table is not None
        if table is not None:
            for r, (b, _, _) in enumerate(chunk):
                group_counts[b] = _add_counts(group_counts[b], table[r])
        at = 0
        for b, i, tokens in chunk:
            m = len(tokens) - 1
            reads[b][1 + i] = _read(logits[at : at + m], [[t] for t in tokens[1:]], k, ref_slice(b, 1 + i, m))
            at += m
        del part, logits
    out_scores = []
    for b, (g, n, read) in enumerate(zip(groups, prefixes, reads, strict=True)):
        tops = [read[o][2] for o in sorted(read)]
        ids_k, logp_k = torch.cat([t[0] for t in tops]), torch.cat([t[1] for t in tops])
        out_scores.append(_combine(g, n, {o: v[:2] for o, v in read.items()}, ids_k, logp_k))
        out_scores[-1].counts = group_counts[b] if counted else None
    return out_scores


def _combine(group: Group, prefix: int, reads: dict[int, tuple], ids: torch.Tensor, logp: torch.Tensor) -> GroupScore:
    """Per continuation totals from the group's reads (order → log-likelihoods per position and
    target, greedy ids); `ids` and `logp` are the top-k reads at the scored positions in their order."""
    head_lls, head_greedy = reads[0]
    score = GroupScore([], [], [], ids, logp)
    shared_ll = sum(head_lls[j][0] for j in range(prefix))
    shared_ok = all(head_greedy[j] == group.continuations[0][j] for j in range(prefix))
    nonempty = 0
    for i, cont in enumerate(group.continuations):
        if not cont:
            score.lls.append(0.0)
            score.greedy.append(True)
            score.argmax.append([])
            continue
        ll = shared_ll + head_lls[prefix][nonempty]
        ok = shared_ok and head_greedy[prefix] == cont[prefix]
        argmax = head_greedy[: prefix + 1]
        nonempty += 1
        if 1 + i in reads:
            own_lls, own_greedy = reads[1 + i]
            ll += sum(x[0] for x in own_lls)
            ok = ok and own_greedy == cont[prefix + 1 :]
            argmax = argmax + own_greedy
        score.lls.append(ll)
        score.greedy.append(bool(ok))
        score.argmax.append(argmax)
    return score


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def greedy_generate(
    model: nn.Module, tokenizer, prompts: Sequence[list[int]], until: Sequence[str], max_tokens: int, pad: int
) -> list[list[int]]:
    """Greedy generation (batched, KV cache) until a stop string appears, EOS, or `max_tokens`."""
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    ids, mask = _left_pad(prompts, pad, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True, logits_to_keep=1)
    cache, position = out.cache, mask.sum(-1)
    generated: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    next_token = out.logits[:, -1].argmax(-1)
    for step in range(max_tokens):
        keep = []
        for row, doc in enumerate(active):
            token = int(next_token[row])
            generated[doc].append(token)
            text = tokenizer.decode(generated[doc])
            if token not in eos and not any(stop in text for stop in until) and step + 1 < max_tokens:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, position, next_token = mask[index], position[index], next_token[index]
            active = [active[r] for r in keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(
            input_ids=next_token[:, None],
            attention_mask=mask,
            position_ids=position[:, None],
            cache=cache,
            use_cache=True,
        )
        position = position + 1
        next_token = out.logits[:, -1].argmax(-1)
    return generated


def scored_positions(group: Group) -> int:
    """How many distinct next-token distributions `score_groups` reads for `group`."""
    n = shared_prefix(group.continuations)
    return n + 1 + sum(max(len(c) - n - 1, 0) for c in group.continuations)


def _distributions(
    scores: Sequence[GroupScore], doc_id: int, reference: DenseReference | None
) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, float | None, int]:
    """Dense: the top-k log-probs to keep. Sparse: mean KL to the reference. Also the position count."""
    ids, logp = torch.cat([s.ids for s in scores]), torch.cat([s.logp for s in scores])
    if reference is None:
        return (ids, logp), None, ids.shape[0]
    return None, float(topk_kl(reference.topk[doc_id][1], logp).mean()), ids.shape[0]


def _check_reference(reference: DenseReference, task: Task, doc_ids: Sequence[int]) -> None:
    if reference.task != task.name:
        raise ValueError(f"the dense reference is for task {reference.task!r}, not {task.name!r}")
    missing = sorted(set(doc_ids) - set(reference.topk))
    if missing:
        raise ValueError(f"the dense reference lacks documents {missing[:5]}{'…' if len(missing) > 5 else ''}")


def evaluate_task(
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
    diffusion: Any = None,
) -> tuple[TaskResult, DenseReference]:
    """Score `doc_ids` of `task` (all when None). Dense run: returns the reference to keep; sparse
    run (pass the dense reference): every DocResult.kl is the mean KL(dense ‖ this run).
    `batch_tokens`: tokens of one forward (default `budget.auto_budget`: from free memory on CUDA);
    on out-of-memory it is halved and the batch re-planned, so no document is lost. `batch_size`:
    the most documents scored together (None: no cap). `packing`: score as packed trees where exact.
    `diffusion`: `DiffusionOptions` for diffusion LLMs (default: its defaults); ignored otherwise."""
    from actsparse.diffusion import evaluate_diffusion_task, is_diffusion_model  # lazy: it imports this module

    if is_diffusion_model(model):  # LLaDA, diffusion_gemma: Monte-Carlo masked likelihood, iterative unmasking
        kwargs = dict(reference=reference, batch_size=batch_size or 16, progress=progress, options=diffusion)
        return evaluate_diffusion_task(model, tokenizer, task, doc_ids, **kwargs)  # type: ignore[arg-type]
    task = get_task(task) if isinstance(task, str) else task
    ids = list(select_docs(task, None) if doc_ids is None else doc_ids)
    if any(not 0 <= d < len(task) for d in ids):
        raise ValueError(f"document ids must lie in [0, {len(task)}) for task {task.name!r}")
    if reference is not None:
        _check_reference(reference, task, ids)
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
            if sum(sizes) != reference.topk[d][0].shape[0]:
                raise ValueError(
                    f"document {d}: {sum(sizes)} scored positions, the reference has "
                    f"{reference.topk[d][0].shape[0]} (another tokenizer or task version?)"
                )
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
        kept, kl, positions = _distributions(mine, d, reference)
        if kept is not None:
            keep.topk[d] = kept
        out.append((d, DocResult(d, metrics[task.metric], metrics, answer, kl, positions)))
    return out
