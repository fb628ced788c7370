"""What a top-p rule costs next to the FFN it sparsifies: (FFN + rule) / FFN.

FFN = the three matmuls and the activation of a gated FFN, down(silu(gate x) * up x). The rule runs on
`input` (x, [T, h]) or on `intermediate` ([T, d]). `sort`: the paper's sort-based top-p mask, then
`rules.apply_mask`; `fast`: `rules.top_p`, the exact fast path (compiled CPU kernel with mask and zeroing
fused / Triton); `mask+apply`: the fast keep-mask, then `rules.apply_mask` (what `sparsify` does, as it also
needs the mask); `mask`: the fast keep-mask alone, not applied. All variants of one case are
timed interleaved in one run and the best round kept, by the wall clock (`--clock cpu`: this process's
CPU time instead, which charges a multithreaded matmul threads × its time). The machine's load average
is printed with the table.

    python benchmarks/topp_overhead.py                      # CPU (float32), and CUDA (bf16) when present
    python benchmarks/topp_overhead.py --shapes 576x1536 --tokens 2048 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from actsparse.sparsity.rules import apply_mask, top_p, top_p_mask_sort
from actsparse.speed.benchmarking import load_average
from actsparse.speed.kernels.topp import top_p_mask_fast

VARIANTS = ("ffn", "sort", "fast", "mask+apply", "mask")


def _shape(text: str) -> tuple[int, int]:
    h, d = text.lower().split("x")
    return int(h), int(d)


def _key(variant: str) -> str:
    return variant.replace("+", "_")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], torch.Tensor], device: str, inner: int, clock: Callable[[], float]) -> float:
    """Seconds per call, averaged over `inner` back-to-back calls."""
    _sync(device)
    start = clock()
    for _ in range(inner):
        fn()
    _sync(device)
    return (clock() - start) / inner


def measure(
    device: str, dtype: torch.dtype, h: int, d: int, tokens: int, p: float, rounds: int, clock: str
) -> list[dict]:
    """Best seconds per call of each variant on both targets, for one FFN shape and token count."""
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(d, h, generator=gen) / h**0.5 for _ in range(2))
    down = torch.randn(h, d, generator=gen) / d**0.5
    gate, up, down = (w.to(device, dtype) for w in (gate, up, down))
    x = torch.randn(tokens, h, generator=gen).to(device, dtype)

    def inner(v: torch.Tensor) -> torch.Tensor:
        return F.silu(F.linear(v, gate)) * F.linear(v, up)

    rules: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "ffn": lambda v: v,
        "sort": lambda v: apply_mask(v, top_p_mask_sort(v, p)),
        "fast": lambda v: top_p(v, p),
        "mask+apply": lambda v: apply_mask(v, top_p_mask_fast(v, p)),
        "mask": lambda v: (top_p_mask_fast(v, p), v)[1],
    }
    calls: dict[tuple[str, str], Callable[[], torch.Tensor]] = {}
    for name, rule in rules.items():
        calls["input", name] = lambda rule=rule: F.linear(inner(rule(x)), down)
        calls["intermediate", name] = lambda rule=rule: F.linear(rule(inner(x)), down)
    timer = time.process_time if clock == "cpu" and device == "cpu" else time.perf_counter
    once = _timed(calls["intermediate", "sort"], device, 1, timer)  # also warms up kernels and caches
    for fn in calls.values():
        fn()
    repeat = max(1, int(0.05 / max(once, 1e-6))) if clock == "cpu" or device == "cuda" else 1
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            samples[key].append(_timed(fn, device, repeat, timer))
    rows = []
    for target in ("input", "intermediate"):
        best = {name: min(samples[target, name]) for name in VARIANTS}
        rows.append(
            {
                "device": device,
                "dtype": str(dtype).removeprefix("torch."),
                "h": h,
                "d": d,
                "tokens": tokens,
                "target": target,
                "p": p,
                "ffn_ms": best["ffn"] * 1e3,
                **{f"ratio_{_key(name)}": best[name] / best["ffn"] for name in VARIANTS[1:]},
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="576x1536,4096x14336", help="comma-separated HxD FFN shapes")
    parser.add_argument("--tokens", default="1,2048", help="comma-separated token counts T")
    parser.add_argument("--devices", default="cpu,cuda", help="cpu and/or cuda (cuda skipped when absent)")
    parser.add_argument("--p", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per case")
    parser.add_argument(
        "--cpu-max-gflop", type=float, default=100.0, help="skip CPU cases whose FFN exceeds this (0: no limit)"
    )
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="wall",
        help="CPU device: the wall time of single calls (the best of --rounds is kept), or this process's CPU "
        "time over ~50 ms samples (counts every thread's time). CUDA always uses wall time.",
    )
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    rows = []
    header = f"{'device':6} {'dtype':8} {'h x d':>11} {'T':>5} {'target':12} {'FFN ms':>9} " + " ".join(
        f"{name:>10}" for name in VARIANTS[1:]
    )
    print(f"clock: {args.clock}; load average {load_average()}")
    print(header)
    for device in args.devices.split(","):
        if device == "cuda" and not torch.cuda.is_available():
            print("cuda: no GPU here, skipped")
            continue
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        for h, d in map(_shape, args.shapes.split(",")):
            for tokens in map(int, args.tokens.split(",")):
                gflop = 6 * tokens * h * d / 1e9
                if device == "cpu" and args.cpu_max_gflop and gflop > args.cpu_max_gflop:
                    print(f"cpu {h}x{d} T={tokens}: FFN is {gflop:.0f} GFLOP, skipped (see --cpu-max-gflop)")
                    continue
                for row in measure(device, dtype, h, d, tokens, args.p, args.rounds, args.clock):
                    rows.append(row)
                    ratios = " ".join(f"{row['ratio_' + _key(name)]:10.3f}" for name in VARIANTS[1:])
                    print(
                        f"{device:6} {row['dtype']:8} {f'{h}x{d}':>11} {tokens:5d} {row['target']:12} "
                        f"{row['ffn_ms']:9.3f} {ratios}",
                        flush=True,
                    )
    print(f"load average {load_average()} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
