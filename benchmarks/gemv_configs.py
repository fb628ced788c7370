"""Launch settings of the Triton sparse GEMV, compared on CUDA: µs and speed-up over dense per setting.

    python benchmarks/gemv_configs.py [--shapes 14336x4096,4096x14336,28672x8192] [--sparsities 0,0.5,0.9]
                                      [--batch 1] [--json PATH]

For each out × in shape and sparsity, times dense `F.linear` and `sparse_rows_matmul` under every
`GemvConfig` of a small grid (block of K rows, block of N columns, programs per multiprocessor,
warps), all in CUDA graphs and back to back as `actsparse bench` does, and prints each setting's
speed-ups, the default's, and the best one per shape. Needs a CUDA GPU and triton.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from actsparse.speed.benchmarking import gemv_operands, time_pair
from actsparse.speed.benchmarking import sparse_input as _sparse_input
from actsparse.speed.kernels.sparse_ffn_triton import GemvConfig, default_config, sparse_rows_matmul

GRID = [
    GemvConfig(block_k, block_n, programs, warps)
    for block_k, block_n, programs, warps in itertools.product((8, 16, 32), (128, 256, 512), (4, 8, 16), (4, 8))
    if block_k * block_n <= 8192
]
STAGES = [
    GemvConfig(*base, num_stages=stages)
    for base in ((16, 256, 8, 4), (16, 512, 16, 4), (8, 512, 8, 4), (32, 256, 4, 4), (32, 128, 8, 4))
    for stages in (1, 2, 3, 4, 6)
]
"""`--grid stages`: the best block shapes of GRID on an H200, under each number of pipeline stages."""


def compare(shape: str, sparsities: list[float], dtype, args) -> list[dict]:
    """One record per launch setting: dense and sparse µs at each sparsity, printed as they come."""
    weights, weights_t, x = gemv_operands(shape, "cuda", dtype, args.working_set, args.batch)
    n = len(weights)
    iters = max(2 * n, 8)

    def dense(i: int):
        return F.linear(x, weights[i % n])

    records = []
    for config in STAGES if args.grid == "stages" else GRID:
        row: dict = {
            "shape": shape,
            "batch": args.batch,
            "config": list(config),
            "default": config == default_config(args.batch),
        }
        for s in sparsities:
            xs = _sparse_input(x, s)

            def sparse(i: int, xs=xs, config=config):
                return sparse_rows_matmul(xs, weights_t[i % n], config=config)

            dense_us, sparse_us, _ = time_pair(dense, sparse, "cuda", args.repeats, iters)
            row[f"{s:g}"] = {"dense_us": round(dense_us, 2), "sparse_us": round(sparse_us, 2)}
        records.append(row)
        cells = "  ".join(f"s={s:g}: {row[f'{s:g}']['sparse_us']:7.1f} µs {_speedup(row, s):5.2f}×" for s in sparsities)
        print(f"{shape:<12} {tuple(config)!s:<22}{' *' if row['default'] else '  '} {cells}", flush=True)
    return records


def masked_input(shape: str, s: float, config: GemvConfig, mode: str, dtype, args) -> float:
    """Speed-up over dense when x arrives unzeroed with a keep-mask, as in `accelerate`: the mask applied
    inside the kernel ('keep') or by `torch.where` before it ('where')."""
    weights, weights_t, x = gemv_operands(shape, "cuda", dtype, args.working_set, args.batch)
    n = len(weights)
    keep = _sparse_input(x, s) != 0
    iters = max(2 * n, 8)

    def dense(i: int):
        return F.linear(x, weights[i % n])

    def sparse(i: int):
        if mode == "keep":
            return sparse_rows_matmul(x, weights_t[i % n], config=config, keep=keep)
        return sparse_rows_matmul(torch.where(keep, x, 0), weights_t[i % n], config=config)

    dense_us, sparse_us, _ = time_pair(dense, sparse, "cuda", args.repeats, iters)
    return dense_us / sparse_us


def _speedup(row: dict, s: float) -> float:
    cell = row[f"{s:g}"]
    return cell["dense_us"] / cell["sparse_us"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="14336x4096,4096x14336,28672x8192")
    parser.add_argument("--sparsities", default="0,0.5,0.9")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--grid", choices=("blocks", "stages"), default="blocks", help="the settings compared")
    parser.add_argument("--batch", type=int, default=1, help="decode tokens (rows of x) per call, at most 8")
    parser.add_argument("--working-set", type=float, default=512.0, help="MB of weight copies to rotate over")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return 1
    dtype = getattr(torch, args.dtype)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    key = 0.5 if 0.5 in sparsities else sparsities[-1]
    records = []
    torch.manual_seed(0)
    with torch.no_grad():
        for shape in args.shapes.split(","):
            rows = compare(shape, sparsities, dtype, args)
            records += rows
            torch.cuda.empty_cache()
            best = max(rows, key=lambda r: _speedup(r, key))
            others = ", ".join(f"s={s:g} {_speedup(best, s):.2f}×" for s in sparsities)
            print(f"best at s={key:g} for {shape}, batch {args.batch}: {tuple(best['config'])}: {others}", flush=True)
            for mode in ("keep", "where"):
                timed = masked_input(shape, key, GemvConfig(*best["config"]), mode, dtype, args)
                print(f"  the same at s={key:g}, x not zeroed, {mode}: {timed:.2f}×", flush=True)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
