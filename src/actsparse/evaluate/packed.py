"""The packed path: every group a token tree (`packing.py`), trees packed several to a row, rows batched
into forwards with a 4D mask and explicit positions.

No padding between documents, every real token runs once, no KV cache, and the vocabulary projection
runs only at scored positions. Exact where the tree mask is (`packing_depth`); the rest takes the cached
path.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from actsparse.evaluate.budget import CPU_TOKENS, LOGITS, Budget
from actsparse.evaluate.encode import Group
from actsparse.evaluate.groups import (
    GroupScore,
    combine,
    count_table,
    scored_positions,
    shared_prefix,
    targets,
    token_counts,
)
from actsparse.evaluate.kl import at_ids, top_k
from actsparse.evaluate.packing import PackedRows, Tree, make_tree, pack, plan_rows
from actsparse.sparsity.instrument import set_real_tokens

PACKED_ATTENTION = ("eager", "sdpa")
FORWARD_TOKENS = CPU_TOKENS
"""Tokens (padding included) of one packed forward, unless a budget says otherwise."""


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


def tree_of(group: Group) -> Tree:
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


def score_packed(
    model: nn.Module,
    groups: Sequence[Group],
    trees: Sequence[Tree],
    pad: int,
    k: int,
    reference: Sequence[torch.Tensor] | None,
    forward_tokens: int | None = None,
    logits: int | None = None,
) -> list[GroupScore]:
    """Score groups as trees packed into rows, the rows batched into forwards of at most `forward_tokens`
    tokens and `logits` logits (default FORWARD_TOKENS and LOGITS)."""
    budget = Budget(forward_tokens or FORWARD_TOKENS, logits or LOGITS)
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
        with token_counts(model) as counts:
            read = list(_read_packed(model, groups, batch, k, reference))
        table = count_table(counts, batch.real.shape)
        for i, score in read:
            if table is not None:
                r, at = batch.where[i]
                score.counts = table[r, at : at + len(trees[i])].sum(0).tolist()
            scores[i] = score
    return scores  # type: ignore[return-value]


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
    with _real_tokens(model, batch.real):
        _, logits = forward_at(
            model,
            keep.to(batch.real.device),
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
    logp = logits.float()
    for start in range(0, logp.shape[0], 256):  # in place, a slice at a time: one [N, V] tensor at most
        logp[start : start + 256] = logp[start : start + 256].log_softmax(-1)
    rank = (keep.flatten().cumsum(0) - 1).tolist()
    first = {i: rank[r * keep.shape[1] + c] for i, (r, c) in first_column.items()}  # its first row of `logp`
    rows: list[int] = []
    tokens: list[int] = []
    for i, at in first.items():
        for j, scored in enumerate(targets(groups[i])):
            rows += [at + j] * len(scored)
            tokens += scored
    lls = logp[torch.tensor(rows, device=logp.device), torch.tensor(tokens, device=logp.device)].tolist()
    greedy = logp.argmax(-1).tolist()
    if reference is None:
        ids, values = top_k(logp, k)
    else:
        ids = torch.empty((logp.shape[0], reference[0].shape[1]), dtype=torch.int32)
        for i, at in first.items():
            ids[at : at + reference[i].shape[0]] = reference[i]
        values = at_ids(logp, ids)
    read = 0
    for i, at in first.items():
        group = groups[i]
        n, size = shared_prefix(group.continuations), scored_positions(group)
        per_row = []
        for scored in targets(group):
            per_row.append(lls[read : read + len(scored)])
            read += len(scored)
        reads = {0: (per_row[: n + 1], greedy[at : at + n + 1])}
        own = n + 1  # a continuation's own positions follow the shared ones, in order
        for c, cont in enumerate(group.continuations):
            m = len(cont) - n - 1
            if m > 0:
                reads[1 + c] = (per_row[own : own + m], greedy[at + own : at + own + m])
                own += m
        yield i, combine(group, n, reads, ids[at : at + size], values[at : at + size])


def forward_at(model: nn.Module, keep: torch.Tensor, **inputs: Any) -> tuple[Any, torch.Tensor]:
    """model(**inputs) and its logits [N, V] at the positions `keep` [B, T] marks: projected there only where
    transformers takes a boolean `logits_to_keep`, else projected everywhere, then selected."""
    out = model(**inputs, logits_to_keep=keep if _masked_logits_to_keep() else 0)
    logits = out.logits
    if logits.dim() == 3:  # every position was projected
        logits = logits[keep.to(logits.device)]
    return out, logits


@functools.cache
def _masked_logits_to_keep() -> bool:
    """Whether this transformers slices hidden states by a boolean [B, T] `logits_to_keep` (5.2x and later)."""
    from transformers import modeling_utils

    return hasattr(modeling_utils, "slice_logits_to_keep")
