"""What the packed and the cached path share: a group's scored positions, how the reads at them add up to
a `GroupScore`, and the per-token sparsity counts of a forward under `sparsify`.

A group's scored positions, in order: the context's last token and the prefix its continuations share
(order 0, one position for all), then each continuation's own tokens but its last (order 1 + i).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from actsparse.evaluate.encode import Group
from actsparse.sparsity.instrument import active_stats
from actsparse.sparsity.stats import TokenCounts


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


def shared_prefix(continuations: Sequence[Sequence[int]]) -> int:
    """Tokens every continuation starts with, leaving each at least one token of its own."""
    if not continuations or not all(continuations):
        return 0
    limit = min(len(c) for c in continuations) - 1
    n = 0
    while n < limit and all(c[n] == continuations[0][n] for c in continuations):
        n += 1
    return n


def scored_positions(group: Group) -> int:
    """How many distinct next-token distributions `score_groups` reads for `group`."""
    n = shared_prefix(group.continuations)
    return n + 1 + sum(max(len(c) - n - 1, 0) for c in group.continuations)


def targets(group: Group) -> Iterator[list[int]]:
    """The token ids scored at each scored position of a group, in order: the shared prefix's, the
    continuations' first own tokens (one position for all), then each continuation's other own tokens."""
    n = shared_prefix(group.continuations)
    yield from ([t] for t in group.continuations[0][:n])
    yield [c[n] for c in group.continuations if c]
    for cont in group.continuations:
        yield from ([t] for t in cont[n + 1 :])


def combine(group: Group, prefix: int, reads: dict[int, tuple], ids: torch.Tensor, logp: torch.Tensor) -> GroupScore:
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


@contextmanager
def token_counts(model: nn.Module) -> Iterator[TokenCounts | None]:
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


def count_table(counts: TokenCounts | None, shape: torch.Size) -> torch.Tensor | None:
    """The block's per-token [zeroed, seen] as [B, T, 2] for a forward of `shape` [B, T], or None."""
    table = None if counts is None else counts.table()
    if table is None or table.shape[0] != shape[0] * shape[1]:
        return None
    return table.reshape(shape[0], shape[1], 2)


def add_counts(total: list[int] | None, rows: torch.Tensor) -> list[int]:
    """`total` [zeroed, seen] plus the counts of `rows` [..., 2]."""
    add = rows.reshape(-1, 2).sum(0).tolist()
    return add if total is None else [total[0] + add[0], total[1] + add[1]]
