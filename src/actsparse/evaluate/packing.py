"""Tree packing: token trees laid out flat, several to a row, scored by one forward with no KV cache.

A tree is a trunk (a context and the prefix its continuations share) and branches (each continuation's
own tokens). A branch attends to the trunk and to its own earlier tokens only, and its positions continue
from the trunk's end, so every token sees exactly the tokens and positions of its own unpadded sequence:
exact for causal models. Trees share a row through a block-diagonal 4D mask; padding at a row's tail
attends to nothing (its mask row is all `min`, so it stays finite) and is flagged in `PackedRows.real`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ATTENTION_TOKENS = 2048
"""Row width at which a token's attention costs as much as its linear layers (for `plan_rows`; measured
2000-3000 for SmolLM2-135M on 2 CPU cores, and the time moves by ~2 % between those)."""


@dataclass(frozen=True)
class Tree:
    """One tree laid out flat: token ids, positions, and branch per token (0: trunk, i: branch i)."""

    tokens: list[int]
    positions: list[int]
    branch: list[int]

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        """The longest root-to-leaf path: the widest attention span any token of the tree needs."""
        return max(self.positions, default=-1) + 1


def make_tree(trunk: Sequence[int], branches: Sequence[Sequence[int]]) -> Tree:
    """The trunk, then each branch in order, positions of every branch continuing from the trunk's end."""
    tokens, positions, branch = list(trunk), list(range(len(trunk))), [0] * len(trunk)
    for i, own in enumerate(branches, start=1):
        tokens += own
        positions += range(len(trunk), len(trunk) + len(own))
        branch += [i] * len(own)
    return Tree(tokens, positions, branch)


def first_fit(sizes: Sequence[int], width: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `sizes` in rows of at most `width` tokens (a larger one alone)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        for r, room in enumerate(free):
            if sizes[i] <= room:
                rows[r].append(i)
                free[r] -= sizes[i]
                break
        else:
            rows.append([i])
            free.append(width - sizes[i])
    return rows


def plan_rows(sizes: Sequence[int], attention_tokens: int | None = None, step: int = 16) -> tuple[int, list[list[int]]]:
    """The row width and rows (indices of `sizes`) with the least cost, rows × width × (1 + width /
    `attention_tokens`): padding is paid like real tokens, and attention grows with the width."""
    if not sizes:
        return 0, []
    attention_tokens = attention_tokens or ATTENTION_TOKENS
    widest = max(sizes)
    best: tuple[float, int, list[list[int]]] | None = None
    for width in range(widest, max(2 * widest, 2 * attention_tokens // 3) + 1, step):
        rows = first_fit(sizes, width)
        cost = len(rows) * width * (1 + width / attention_tokens)
        if best is None or cost < best[0]:
            best = (cost, width, rows)
    assert best is not None
    return best[1], best[2]


@dataclass
class PackedRows:
    """A forward's inputs: ids, positions and `real` flags [B, W], the additive tree mask [B, 1, W, W],
    and for each tree packed (its index, in row order) the row and the column where it starts."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    real: torch.Tensor
    where: dict[int, tuple[int, int]]


def pack(trees: Sequence[Tree], rows: Sequence[Sequence[int]], pad: int, dtype: torch.dtype, device) -> PackedRows:
    """Lay `trees` out in `rows` (indices into `trees`), padded on the right to the widest row."""
    width = max(sum(len(trees[i]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    tree_of = torch.full((len(rows), width), -1, dtype=torch.long)
    branch = torch.zeros((len(rows), width), dtype=torch.long)
    where: dict[int, tuple[int, int]] = {}
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            tree, stop = trees[i], at + len(trees[i])
            ids[r, at:stop] = torch.tensor(tree.tokens)
            positions[r, at:stop] = torch.tensor(tree.positions)
            branch[r, at:stop] = torch.tensor(tree.branch)
            tree_of[r, at:stop] = i
            where[i] = (r, at)
            at = stop
    return PackedRows(
        ids.to(device),
        positions.to(device),
        tree_mask(tree_of, branch, positions, dtype).to(device),
        (tree_of >= 0).to(device),
        where,
    )


def tree_mask(tree_of: torch.Tensor, branch: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, W, W] additive mask (0: attend, dtype's min: not): a token attends to the earlier tokens
    of its own tree's trunk and of its own branch; padding (tree -1) attends to nothing."""
    same_tree = (tree_of[:, :, None] == tree_of[:, None, :]) & (tree_of >= 0)[:, :, None]
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    causal = positions[:, None, :] <= positions[:, :, None]
    allowed = same_tree & visible & causal
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
