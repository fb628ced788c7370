"""Scoring for masked-diffusion LLMs: Monte-Carlo masked log-likelihood and iterative unmasking.

Multiple choice follows the LLaDA paper's estimator of log p(answer | prompt): per sample, a mask
ratio t is drawn uniformly from {1/L, …, 1} (the paper's lower-variance form of t ~ U(0, 1)), t·L of
the L answer tokens are noised, and the log-probs of the noised tokens are summed with weight 1/t.
Generation is LLaDA's low-confidence remasking: blocks of `block_length` tokens left to right, each
unmasked over its share of `steps` by committing the most confident predictions. Samples and noise
are seeded per document, so a dense and a sparse run see the same masks (paired KL). Each denoising
forward (a Monte-Carlo sample, or a generation step) is one step of the per-step statistics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from actsparse.diffusion.denoisers import Denoiser, denoiser_for
from actsparse.diffusion.options import DiffusionOptions
from actsparse.evaluate.encode import Encoder, left_pad
from actsparse.evaluate.kl import TOPK, at_ids, top_k
from actsparse.evaluate.metrics import (
    GOLD_PROBABILITY,
    choice_metrics,
    cut_at_stop,
    exact_match,
    gold_probability,
    topk_kl,
)
from actsparse.evaluate.reference import DenseReference
from actsparse.evaluate.results import DocResult, TaskResult
from actsparse.sparsity.instrument import active_stats
from actsparse.tasks import Completion, Generation, MultipleChoice, Task, task_docs


@contextmanager
def denoising_steps(model: nn.Module) -> Iterator[Callable[[int | None], None]]:
    """Count the running `sparsify` statistics per step: yields `set_step(k)`; a new trajectory starts."""
    stats = active_stats(model)
    for s in stats:
        s.steps.new_trajectory()

    def set_step(step: int | None) -> None:
        for s in stats:
            s.step = step

    try:
        yield set_step
    finally:
        set_step(None)


def _generator(seed: int, doc_id: int, row: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + doc_id * 1_009 + row)


def _right_pad(seqs: Sequence[Sequence[int]], pad: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def mc_loglikelihood(
    denoiser: Denoiser,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator],
    samples: int,
    pad: int,
    set_step: Callable[[int | None], None] = lambda step: None,
) -> tuple[list[float], list[torch.Tensor]]:
    """Monte-Carlo estimates of log p(answer | prompt) per row, and the logits of every noised position."""
    device = denoiser.device
    rows = len(prompts)
    state = denoiser.encode(*left_pad(prompts, pad, device))
    width = max(1, max(len(a) for a in answers))
    clean, canvas_mask = _right_pad(answers, pad, width)
    lls = [0.0] * rows
    scored: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    for sample in range(samples):
        noisy, where = clean.clone(), torch.zeros_like(clean, dtype=torch.bool)
        weights = []
        for r, answer in enumerate(answers):
            n = len(answer)
            if n == 0:
                weights.append(0.0)
                continue
            k = int(torch.randint(1, n + 1, (1,), generator=generators[r]))
            chosen = torch.randperm(n, generator=generators[r])[:k]
            where[r, chosen] = True
            noisy[r, chosen] = denoiser.noise_tokens(k, generators[r])
            weights.append(n / k)
        set_step(sample)
        logits = denoiser.predict(state, noisy.to(device), canvas_mask.to(device))
        logp = logits.log_softmax(-1)
        target = logp.gather(-1, clean.to(device)[..., None])[..., 0]
        where_d = where.to(device)
        for r in range(rows):
            if weights[r]:
                lls[r] += weights[r] * float(target[r][where_d[r]].sum()) / samples
                scored[r].append(logits[r][where_d[r]])
    set_step(None)
    vocab = logits.shape[-1]
    return lls, [torch.cat(s) if s else torch.zeros(0, vocab, device=device) for s in scored]


def _transfer_counts(n: int, steps: int) -> list[int]:
    """Tokens committed at each of `steps` steps: n split evenly, the remainder first (as LLaDA)."""
    base, extra = divmod(n, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    prompts: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator],
    length: int,
    steps: int,
    block_length: int,
    pad: int,
    set_step: Callable[[int | None], None] = lambda step: None,
) -> tuple[list[list[int]], torch.Tensor]:
    """Iterative unmasking with low-confidence remasking: `length` tokens per prompt, and the first
    step's logits [B, length, V] (every position noised: the paired KL's distributions)."""
    device = denoiser.device
    rows = len(prompts)
    state = denoiser.encode(*left_pad(prompts, pad, device))
    canvas = torch.stack([denoiser.noise_tokens(length, g) for g in generators]).to(device)
    canvas_mask = torch.ones_like(canvas)
    committed = torch.zeros_like(canvas, dtype=torch.bool)
    blocks = -(-length // block_length)
    per_block = max(1, steps // blocks)
    first: torch.Tensor | None = None
    previous: torch.Tensor | None = None
    step = 0
    for block in range(blocks):
        lo, hi = block * block_length, min(length, (block + 1) * block_length)
        for count in _transfer_counts(hi - lo, per_block):
            set_step(step)
            logits = denoiser.predict(state, canvas, canvas_mask, previous)
            step += 1
            first = logits if first is None else first
            previous = logits
            if count == 0:
                continue
            probs = logits.softmax(-1)
            if denoiser.noise_token is not None:  # the mask token is never committed
                probs[..., denoiser.noise_token] = 0.0
            confidence, predicted = probs.max(-1)
            confidence[:, :lo] = -1.0
            confidence[:, hi:] = -1.0
            confidence[committed] = -1.0
            chosen = confidence.topk(count, dim=-1).indices
            canvas.scatter_(1, chosen, predicted.gather(1, chosen))
            committed.scatter_(1, chosen, True)
            if not bool(committed.all()):  # the rest is noised again (a no-op for a mask token)
                fresh = torch.stack([denoiser.noise_tokens(length, g) for g in generators]).to(device)
                canvas = torch.where(committed, canvas, fresh)
    set_step(None)
    assert first is not None
    return [canvas[r].tolist() for r in range(rows)], first


def _kl_or_keep(
    logits: torch.Tensor, doc_id: int, reference: DenseReference | None, keep: DenseReference
) -> tuple[float | None, int]:
    """Dense: keep the top-k log-probs. Sparse: mean KL(dense ‖ sparse) at the same positions."""
    logp = logits.float().log_softmax(-1)
    if reference is None:
        keep.topk[doc_id] = top_k(logp, keep.k)
        return None, logp.shape[0]
    reference.check_positions(doc_id, logp.shape[0])
    if logp.shape[0] == 0:
        return 0.0, 0
    ref_ids, ref_logp = reference.topk[doc_id]
    return float(topk_kl(ref_logp, at_ids(logp, ref_ids)).mean()), logp.shape[0]


def evaluate_diffusion_task(
    model: nn.Module,
    tokenizer,
    task: str | Task,
    doc_ids: Sequence[int] | None = None,
    *,
    reference: DenseReference | None = None,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
    options: DiffusionOptions | None = None,
) -> tuple[TaskResult, DenseReference]:
    """`evaluate_task` for diffusion LLMs: same contract, scored as the module docstring says."""
    denoiser = denoiser_for(model)
    if denoiser is None:
        raise ValueError(f"{type(model).__name__} is not a diffusion model this scorer knows")
    options = options or DiffusionOptions()
    task, ids = task_docs(task, doc_ids)
    if reference is not None:
        reference.check(task.name, ids)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    encoder = Encoder(tokenizer)
    keep = reference if reference is not None else DenseReference(task.name, TOPK)
    results: dict[int, DocResult] = {}
    for start in range(0, len(ids), batch_size):
        batch = ids[start : start + batch_size]
        for d, result in _score_batch(model, denoiser, tokenizer, encoder, task, batch, reference, keep, options):
            results[d] = result
        if progress is not None:
            progress(len(batch))
    return TaskResult(task.name, task.split, task.metric, [results[d] for d in ids]), keep


def _score_batch(
    model: nn.Module,
    denoiser: Denoiser,
    tokenizer,
    encoder: Encoder,
    task: Task,
    batch: Sequence[int],
    reference: DenseReference | None,
    keep: DenseReference,
    options: DiffusionOptions,
) -> list[tuple[int, DocResult]]:
    requests = {d: task.request(d) for d in batch}
    out: list[tuple[int, DocResult]] = []
    choices = {d: r for d, r in requests.items() if isinstance(r, MultipleChoice)}
    choice_docs = list(choices)
    if choice_docs:
        rows = [(d, i, *encoder.pair(c, a)) for d in choice_docs for i, (c, a) in enumerate(choices[d].pairs())]
        gens = [_generator(options.seed, d, i) for d, i, _, _ in rows]
        with denoising_steps(model) as set_step:
            lls, scored = mc_loglikelihood(
                denoiser, [r[2] for r in rows], [r[3] for r in rows], gens, options.mc_samples, encoder.pad, set_step
            )
        for d in choice_docs:
            mine = [j for j, r in enumerate(rows) if r[0] == d]
            doc_lls = [lls[j] for j in mine]
            metrics, pred, pred_norm = choice_metrics(doc_lls, choices[d].choices, choices[d].gold)
            normalized = task.metric == "acc_norm"
            metrics[GOLD_PROBABILITY] = gold_probability(doc_lls, choices[d].choices, choices[d].gold, normalized)
            kl, n = _kl_or_keep(torch.cat([scored[j] for j in mine]), d, reference, keep)
            answer = str(pred_norm if task.metric == "acc_norm" else pred)
            out.append((d, DocResult(d, metrics[task.metric], metrics, answer, kl, n)))
    for d in batch:  # lambada and generation: one document at a time (their lengths differ)
        request = requests[d]
        if isinstance(request, MultipleChoice):
            continue
        gens = [_generator(options.seed, d, 0)]
        if isinstance(request, Completion):
            prompt, target = encoder.pair(request.context, request.target)
            n = max(1, len(target))
            with denoising_steps(model) as set_step:
                tokens, first = generate(denoiser, [prompt], gens, n, n, n, encoder.pad, set_step)
            metrics = {"acc": float(tokens[0] == target)}
            answer = tokenizer.decode(tokens[0])
        else:
            assert isinstance(request, Generation)
            length = min(options.gen_length, request.max_tokens)
            with denoising_steps(model) as set_step:
                tokens, first = generate(
                    denoiser,
                    [encoder.encode(request.prompt)],
                    gens,
                    length,
                    options.steps,
                    options.block_length,
                    encoder.pad,
                    set_step,
                )
            answer = cut_at_stop(tokenizer.decode(tokens[0], skip_special_tokens=True), request.until)
            metrics = {"exact_match": exact_match(answer, request.answers)}
        kl, n_scored = _kl_or_keep(first[0], d, reference, keep)
        out.append((d, DocResult(d, metrics[task.metric], metrics, answer, kl, n_scored)))
    order = {d: i for i, d in enumerate(batch)}
    return sorted(out, key=lambda item: order[item[0]])
