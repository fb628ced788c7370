"""Requests as token ids, tokenised the way lm-eval's HFLM does, and left-padded batches of them: shared by
the causal and diffusion scorers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Encoder", "Group", "left_pad", "position_ids"]


@dataclass
class Group:
    """A context and the continuations scored after it (token ids)."""

    context: list[int]
    continuations: list[list[int]]


class Encoder:
    """Tokenises as lm-eval's HFLM: context and context+continuation encoded, continuation = the rest."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.prefix = bos if bos is not None else eos  # HFLM.prefix_token_id: context of an empty context
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix], list(self.tokenizer.encode(continuation, add_special_tokens=False))
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx) :]

    def groups(self, pairs: Sequence[tuple[str, str]]) -> list[Group]:
        """Pairs sharing a context become one group (its continuations in order)."""
        out: list[Group] = []
        for context, continuation in pairs:
            ctx, cont = self.pair(context, continuation)
            if out and out[-1].context == ctx:
                out[-1].continuations.append(cont)
            else:
                out.append(Group(ctx, [cont]))
        return out


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] left-padded with `pad`, and their attention mask, on `device`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch from its attention mask: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
