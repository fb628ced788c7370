"""The fast scorer: batched, padded, and for multiple choice the shared context runs once per document.

Every document becomes groups of token ids: a context and the continuations scored after it. One
forward runs the batch's contexts, each extended by the prefix its continuations share (left-padded,
explicit positions); the KV cache is then expanded over the continuations' own tokens, which run in
chunks of similar length (right-padded, full-length attention mask). Documents are batched by length
(at most `batch_size`, cut where padding would cost more than a forward), and the vocabulary projection
runs only at scored positions.
This is exact for causal models, and under `sparsify` too, because rules act on each token's own vector.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from actsparse.evaluate.metrics import choice_metrics, cut_at_stop, exact_match, topk_kl
from actsparse.evaluate.reference import DenseReference
from actsparse.evaluate.results import DocResult, TaskResult
from actsparse.tasks import Completion, Generation, MultipleChoice, Request, Task, get_task, select_docs

TOPK = 32
"""Dense log-probs kept per scored position for KL (the rest of the vocabulary is one bucket)."""


@dataclass
class Group:
    """A context and the continuations scored after it (token ids)."""

    context: list[int]
    continuations: list[list[int]]


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


@torch.no_grad()
def score_groups(
    model: nn.Module,
    groups: Sequence[Group],
    pad: int,
    *,
    k: int = TOPK,
    reference: Sequence[torch.Tensor] | None = None,
    chunk_tokens: int = 1024,
) -> list[GroupScore]:
    """Log-likelihoods of every continuation of every group.

    One forward runs the contexts, each extended by the prefix its continuations share; the KV
    cache is then expanded over the continuations' own tokens, which run in chunks of similar length.
    `reference`: per group, the dense top-k ids [P, k] at which to read this run's log-probs.
    """
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
        offsets.append((off, at))

    def ref_slice(b: int, order: int, size: int) -> torch.Tensor | None:
        if reference is None:
            return None
        if reference[b].shape[0] != offsets[b][1]:
            raise ValueError(f"{offsets[b][1]} scored positions, the dense reference has {reference[b].shape[0]}")
        start = offsets[b][0][order]
        return reference[b][start : start + size]

    contexts = [g.context + g.continuations[0][:n] for g, n in zip(groups, prefixes, strict=True)]
    ids, mask = _left_pad(contexts, pad, device)
    # the vocabulary projection runs only at scored positions: each row's last n + 1 (a flat [N, V])
    width = ids.shape[1]
    scored = torch.arange(width, device=device) >= width - 1 - torch.tensor(prefixes, device=device)[:, None]
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=True, logits_to_keep=scored
    )
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
        logits = model(
            input_ids=cids,
            attention_mask=torch.cat([mask[index], cmask], dim=1),
            position_ids=lengths[index, None] + torch.arange(width, device=device),
            cache=part,
            use_cache=True,
            logits_to_keep=cmask.bool(),  # real positions only, flat [N, V]
        ).logits
        at = 0
        for b, i, tokens in chunk:
            m = len(tokens) - 1
            reads[b][1 + i] = _read(logits[at : at + m], [[t] for t in tokens[1:]], k, ref_slice(b, 1 + i, m))
            at += m
        del part, logits
    return [_combine(g, n, r) for g, n, r in zip(groups, prefixes, reads, strict=True)]


def _combine(group: Group, prefix: int, reads: dict[int, tuple]) -> GroupScore:
    """Per continuation totals from the group's reads; the scored positions in their fixed order."""
    head_lls, head_greedy, _ = reads[0]
    tops = [reads[o][2] for o in sorted(reads)]
    score = GroupScore([], [], [], torch.cat([t[0] for t in tops]), torch.cat([t[1] for t in tops]))
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
            own_lls, own_greedy, _ = reads[1 + i]
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
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> tuple[TaskResult, DenseReference]:
    """Score `doc_ids` of `task` (all when None). Dense run: returns the reference to keep; sparse
    run (pass the dense reference): every DocResult.kl is the mean KL(dense ‖ this run).
    `batch_size`: the most documents scored together."""
    from actsparse.diffusion import evaluate_diffusion_task, is_diffusion_model  # lazy: it imports this module

    if is_diffusion_model(model):  # LLaDA, diffusion_gemma: Monte-Carlo masked likelihood, iterative unmasking
        kwargs = dict(reference=reference, batch_size=batch_size, progress=progress)
        return evaluate_diffusion_task(model, tokenizer, task, doc_ids, **kwargs)  # type: ignore[arg-type]
    task = get_task(task) if isinstance(task, str) else task
    ids = list(select_docs(task, None) if doc_ids is None else doc_ids)
    if any(not 0 <= d < len(task) for d in ids):
        raise ValueError(f"document ids must lie in [0, {len(task)}) for task {task.name!r}")
    if reference is not None:
        _check_reference(reference, task, ids)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encoder = Encoder(tokenizer)
    keep = reference if reference is not None else DenseReference(task.name, TOPK)
    requests = {d: task.request(d) for d in ids}
    encoded = {d: _encode(encoder, requests[d]) for d in ids}
    results: dict[int, DocResult] = {}
    order = sorted(ids, key=lambda d: -_width(encoded[d]))  # batches of similar length: little padding
    widths = [_width(encoded[d]) for d in order]
    steps = max((r.max_tokens for r in requests.values() if isinstance(r, Generation)), default=0)
    # at most batch_size documents a batch, cut where the padding would cost more than another batch's forwards
    cost = FORWARD_COST * (1 + steps)
    for start, stop in plan_chunks(widths, batch_size * max(widths, default=1), cost, max_rows=batch_size):
        batch = order[start:stop]
        for doc_id, result in _score_batch(model, tokenizer, task, batch, requests, encoded, reference, keep):
            results[doc_id] = result
        if progress is not None:
            progress(len(batch))
    docs = [results[d] for d in ids]
    return TaskResult(task.name, task.split, task.metric, docs), keep


def _encode(encoder: Encoder, request: Request) -> list[Group] | list[int]:
    """Groups of token ids (multiple choice, completion) or the prompt's ids (generation)."""
    if isinstance(request, MultipleChoice):
        return encoder.groups(request.pairs())
    if isinstance(request, Completion):
        return encoder.groups([(request.context, request.target)])
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
    scores = score_groups(model, flat, pad, k=keep.k, reference=refs)
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
        elif isinstance(request, Completion):
            metrics = {"acc": float(mine[0].greedy[0])}
            answer = tokenizer.decode(mine[0].argmax[0])
        else:
            text = cut_at_stop(tokenizer.decode(generations[d], skip_special_tokens=True), request.until)
            metrics, answer = {"exact_match": exact_match(text, request.answers)}, text
            if reference is None:
                keep.generated[d] = generations[d]
        kept, kl, positions = _distributions(mine, d, reference)
        if kept is not None:
            keep.topk[d] = kept
        out.append((d, DocResult(d, metrics[task.metric], metrics, answer, kl, positions)))
    return out
