"""Bits per byte of a gold continuation, OLMo's low-noise metric (SPEC §4b)."""

from __future__ import annotations

import math


def bits_per_byte(loglikelihood: float, text: str) -> float:
    """Summed negative log-likelihood (natural log, as the scorer returns it) in bits / UTF-8 bytes of `text`."""
    size = len(text.encode("utf-8"))
    if size == 0:
        raise ValueError("bits per byte needs a non-empty continuation")
    return -loglikelihood / math.log(2) / size


def gold_metrics(loglikelihood: float, text: str) -> dict[str, float]:
    """A gold continuation's metrics: bpb (lower is better), inv_bpb = bytes per bit (the task score,
    higher is better; see `actsparse.tasks.oe_eval`), the NLL in bits and the byte count."""
    bpb = bits_per_byte(loglikelihood, text)
    return {
        "bpb": bpb,
        "inv_bpb": 1.0 / max(bpb, 1e-9),
        "nll_bits": -loglikelihood / math.log(2),
        "bytes": float(len(text.encode("utf-8"))),
    }
