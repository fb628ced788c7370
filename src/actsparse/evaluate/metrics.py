"""Pure metric functions, as lm-evaluation-harness 0.4.13 computes them."""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def argmax_first(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties (as numpy.argmax)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def choice_metrics(lls: Sequence[float], choices: Sequence[str], gold: int) -> tuple[dict[str, float], int, int]:
    """acc and acc_norm (log-likelihood per character of the choice text); also both predictions."""
    pred = argmax_first(lls)
    pred_norm = argmax_first([ll / len(c) if c else float("-inf") for ll, c in zip(lls, choices, strict=True)])
    return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold)}, pred, pred_norm


def cut_at_stop(text: str, until: Sequence[str]) -> str:
    """The generation up to the first stop string, then stripped (lm-eval: until + remove_whitespace)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text.strip()


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation removed: lm-eval's exact_match(ignore_case, ignore_punctuation)."""
    return text.lower().translate(_PUNCTUATION)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(a) for a in answers))


TAIL_RESOLUTION = 1e-6
"""Probability mass below which a tail computed as 1 − Σ p of float32 log-probs is rounding error."""


def topk_kl(ref_logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) per row, from P's top-k log-probs and Q's log-probs at the same tokens.

    The rest of the vocabulary is one bucket on each side, so this is the exact KL of the coarsened
    distributions: a lower bound of the full KL, equal to it when P's tail mass is zero.
    """
    import torch  # here: the metric names and text metrics are read without torch (analysis, the CLI)

    logp, logq = ref_logp.double(), logq.double()
    p, q = logp.exp(), logq.exp()
    head = (p * (logp - logq)).sum(-1)
    # tails are 1 − Σ of float32 probabilities: below TAIL_RESOLUTION they are rounding, not mass
    p_tail = 1 - p.sum(-1)
    q_tail = (1 - q.sum(-1)).clamp(min=TAIL_RESOLUTION)
    tail = torch.where(p_tail > TAIL_RESOLUTION, p_tail * (p_tail.clamp(min=TAIL_RESOLUTION).log() - q_tail.log()), 0.0)
    return (head + tail).clamp(min=0)


GOLD_PROBABILITY = "p_gold"
"""DocResult.metrics key of the low-noise measure of multiple choice and greedy-match tasks (higher is better)."""
BITS_PER_BYTE = "bpb"
"""DocResult.metrics key of bits per byte (lower is better; normalised performance = dense / sparse)."""


def gold_probability(lls: Sequence[float], choices: Sequence[str], gold: int, normalized: bool = False) -> float:
    """Probability of the gold choice under a softmax over the choices' log-likelihoods: the expected
    accuracy of sampling an answer. `normalized`: per character of the choice text, as acc_norm ranks."""
    import torch

    values = [ll / len(c) if c else float("-inf") for ll, c in zip(lls, choices, strict=True)] if normalized else lls
    scores = torch.tensor(values, dtype=torch.float64)
    return float(scores.softmax(0)[gold]) if torch.isfinite(scores).any() else float("nan")


def bits_per_byte(nll_nats: float, text: str) -> float:
    """Summed negative log-likelihood (nats) of `text` in bits per UTF-8 byte (OLMo's definition)."""
    size = len(text.encode("utf-8"))
    return nll_nats / math.log(2) / size if size else float("nan")
