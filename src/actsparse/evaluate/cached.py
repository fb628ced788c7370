"""The cached path: one forward runs every group's context (left-padded) and the prefix its continuations
share; the KV cache is then expanded over the continuations' own tokens, in chunks of similar length.

It needs no custom attention mask, so it scores what packing cannot score exactly (`packed.packing_depth`:
other attention implementations, chunked or bidirectional attention, trees deeper than a sliding window).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from actsparse.evaluate.encode import Group, left_pad, position_ids
from actsparse.evaluate.groups import GroupScore, add_counts, combine, count_table, shared_prefix, token_counts
from actsparse.evaluate.kl import at_ids, top_k
from actsparse.evaluate.packed import forward_at
from actsparse.sparsity.instrument import counted_as_prefill

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


def read_positions(logits: torch.Tensor, targets: list[list[int]], k: int, ref_ids: torch.Tensor | None):
    """At each position: log-probs of its candidate targets, its argmax, and the top-k summary."""
    logp = logits.float().log_softmax(-1)
    greedy = logp.argmax(-1).tolist()
    lls = [[float(logp[j, t]) for t in ts] for j, ts in enumerate(targets)]
    if ref_ids is None:
        return lls, greedy, top_k(logp, k)
    return lls, greedy, (ref_ids, at_ids(logp, ref_ids))


def score_cached(
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
    ids, mask = left_pad(contexts, pad, device)
    # the vocabulary projection runs only at scored positions: each row's last n + 1 (a flat [N, V])
    width = ids.shape[1]
    scored = torch.arange(width, device=device) >= width - 1 - torch.tensor(prefixes, device=device)[:, None]
    with token_counts(model) as counts:
        out, first_logits = forward_at(
            model, scored, input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True
        )
    table = count_table(counts, ids.shape)
    group_counts: list[list[int] | None] = [None] * len(groups)
    counted = table is not None
    if table is not None:
        group_counts = [add_counts(None, table[b]) for b in range(len(groups))]
    cache = out.cache
    reads: list[dict[int, tuple]] = []
    at = 0
    for b, (g, n) in enumerate(zip(groups, prefixes, strict=True)):
        targets = [[t] for t in g.continuations[0][:n]] + [[c[n] for c in g.continuations if c]]
        reads.append({0: read_positions(first_logits[at : at + n + 1], targets, k, ref_slice(b, 0, n + 1))})
        at += n + 1
    del out, first_logits
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
        with counted_as_prefill(model), token_counts(model) as counts:
            _, logits = forward_at(  # real positions only, flat [N, V]
                model,
                cmask.bool(),
                input_ids=cids,
                attention_mask=torch.cat([mask[index], cmask], dim=1),
                position_ids=lengths[index, None] + torch.arange(width, device=device),
                cache=part,
                use_cache=True,
            )
        table = count_table(counts, cids.shape)
        counted = counted and table is not None
        if table is not None:
            for r, (b, _, _) in enumerate(chunk):
                group_counts[b] = add_counts(group_counts[b], table[r])
        at = 0
        for b, i, tokens in chunk:
            m = len(tokens) - 1
            reads[b][1 + i] = read_positions(logits[at : at + m], [[t] for t in tokens[1:]], k, ref_slice(b, 1 + i, m))
            at += m
        del part, logits
    out_scores = []
    for b, (g, n, read) in enumerate(zip(groups, prefixes, reads, strict=True)):
        tops = [read[o][2] for o in sorted(read)]
        ids_k, logp_k = torch.cat([t[0] for t in tops]), torch.cat([t[1] for t in tops])
        out_scores.append(combine(g, n, {o: v[:2] for o, v in read.items()}, ids_k, logp_k))
        out_scores[-1].counts = group_counts[b] if counted else None
    return out_scores
