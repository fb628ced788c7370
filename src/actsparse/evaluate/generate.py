"""Greedy generation for generate tasks: batched, on a KV cache, each prompt until a stop string, EOS or
`max_tokens`. The scorer then teacher-forces the dense run's generation to read its distributions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from actsparse.evaluate.encode import left_pad, position_ids


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
    ids, mask = left_pad(prompts, pad, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, logits_to_keep=1)
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
