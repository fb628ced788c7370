"""What a mask predictor costs beside the FFN it lets skip: the FFN's net decode time with the
predictor's overhead counted (batch 1, float32, CPU).

Variants, timed interleaved in one run (best of the rounds kept):
  dense      down(silu(gate x) * up x), torch's own matmuls (F.linear or mv, the faster of the two)
  predictor  the low-rank predictor alone: logits = B(A x), the kept indices = nonzero(logits > 0)
  sparse     the FFN over the predicted entries only: gather their rows of W_g, W_u and W_dᵀ, then GEMVs
  net        predictor + sparse: what a predictor-based engine pays per token
  limit      GEMVs over the kept rows gathered in advance (no gather, no predictor): the best case
The kept fraction is the predictor's measured one (`--run-dir`: the mean predicted sparsity on held-out
calibration tokens of its `calibration/predictor-*.json`) or `--sparsity`. Times are wall-clock (the
default); `--clock cpu` takes this process's CPU time instead, which charges a multithreaded matmul
threads × its time. Time on a quiet machine: the load average is printed beside the figures.

    python benchmarks/predictor_cost.py --run-dir runs/pred_intermediate
    python benchmarks/predictor_cost.py --shape 576x1536 --rank 64 --sparsity 0.5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from actsparse.methods.predictor import ffn_flops, predictor_flops
from actsparse.speed.benchmarking import load_average


def _shape(text: str) -> tuple[int, int]:
    h, d = text.lower().split("x")
    return int(h), int(d)


def _predicted(run_dir: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "calibration").glob("predictor-*.json"))]
    if not records:
        raise SystemExit(f"no calibration/predictor-*.json in {run_dir}")
    return records


def bench(
    h: int, d: int, rank: int, sparsity: float, rounds: int, reps: int, clock: str, layers: int
) -> dict[str, float]:
    """Best time per FFN of each variant, one token passing through `layers` FFNs of distinct weights
    (so that, as in a real decode step, the weights do not stay in cache between calls)."""
    torch.manual_seed(0)
    kept = max(1, round(d * (1 - sparsity)))
    ws = []
    for _ in range(layers):
        w_g, w_u = torch.randn(d, h) / h**0.5, torch.randn(d, h) / h**0.5
        w_d_t = torch.randn(d, h) / d**0.5  # W_dᵀ: a row per intermediate entry
        a, b, bias = torch.randn(rank, h) / h**0.5, torch.randn(d, rank) / rank**0.5, torch.zeros(d)
        order = torch.randperm(d)
        bias[order[:kept]] = 100.0  # the predictor keeps exactly `kept` entries (its logits' sign is what matters)
        bias[order[kept:]] = -100.0
        idx = order[:kept].sort().values
        gathered = (w_g[idx].contiguous(), w_u[idx].contiguous(), w_d_t[idx].contiguous())
        ws.append((w_g, w_u, w_d_t, w_d_t.t().contiguous(), a, b, bias, idx, gathered))
    x = torch.randn(h)

    def dense_linear(w) -> torch.Tensor:
        w_g, w_u, _, w_d = w[:4]
        return F.linear(F.silu(F.linear(x, w_g)) * F.linear(x, w_u), w_d)

    def dense_mv(w) -> torch.Tensor:
        w_g, w_u, w_d_t = w[:3]
        return (F.silu(w_g @ x) * (w_u @ x)) @ w_d_t

    def predictor(w) -> torch.Tensor:
        a, b, bias = w[4:7]
        return ((b @ (a @ x) + bias) > 0).nonzero().squeeze(-1)

    def sparse(w, idx=None) -> torch.Tensor:
        w_g, w_u, w_d_t = w[:3]
        idx = w[7] if idx is None else idx
        g = w_g.index_select(0, idx) @ x
        u = w_u.index_select(0, idx) @ x
        return (F.silu(g) * u) @ w_d_t.index_select(0, idx)

    def net(w) -> torch.Tensor:
        return sparse(w, predictor(w))

    def limit(w) -> torch.Tensor:
        g_k, u_k, d_k = w[8]
        return (F.silu(g_k @ x) * (u_k @ x)) @ d_k

    assert torch.allclose(net(ws[0]), limit(ws[0]), atol=1e-4)  # the same FFN output over the kept entries
    assert torch.allclose(dense_linear(ws[0]), dense_mv(ws[0]), atol=1e-4)
    variants = {
        "dense_linear": dense_linear,
        "dense_mv": dense_mv,
        "predictor": predictor,
        "sparse": sparse,
        "net": net,
        "limit": limit,
    }
    now = time.process_time if clock == "cpu" else time.perf_counter
    best = {k: float("inf") for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            for w in ws:
                fn(w)
            start = now()
            for _ in range(reps):
                for w in ws:
                    fn(w)
            best[name] = min(best[name], (now() - start) / (reps * layers))
    best["dense"] = min(best.pop("dense_linear"), best.pop("dense_mv"))  # the best dense path
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run-dir", type=Path, help="a sweep folder with trained predictors (their shape, rank, sparsity)"
    )
    parser.add_argument("--shape", default="576x1536", help="h x d (default: SmolLM2-135M)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.5, help="predicted sparsity, without --run-dir")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=30, help="FFNs of distinct weights a token passes (SmolLM2: 30)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall-clock or process CPU time")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    h, d = _shape(args.shape)
    cases = []
    if args.run_dir:
        for record in _predicted(args.run_dir):
            layers = record["per_layer"].values()
            s = sum(m["predicted_sparsity"] for m in layers) / len(layers)
            cases.append((record["rank"], s, record["p"]))
    else:
        cases.append((args.rank, args.sparsity, None))
    out = []
    print(
        f"shape h={h} d={d}, float32, batch 1, {args.layers} layers, {args.threads} thread(s), {args.clock} clock, "
        f"best of {args.rounds} rounds; times per FFN; load average {load_average()}"
    )
    print(
        f"{'p':>5} {'rank':>4} {'sparsity':>8} | {'dense µs':>8} {'pred µs':>8} {'sparse µs':>9} {'net µs':>8} "
        f"{'limit µs':>8} | {'net speed-up':>12} {'limit':>6} {'1/(1-s)':>7} {'pred FLOPs/FFN':>14}"
    )
    for rank, s, p in cases:
        t = bench(h, d, rank, s, args.rounds, args.reps, args.clock, args.layers)
        row = {
            "p": p,
            "rank": rank,
            "sparsity": s,
            **{f"{k}_us": v * 1e6 for k, v in t.items()},
            "net_speedup": t["dense"] / t["net"],
            "limit_speedup": t["dense"] / t["limit"],
            "flops_ratio": predictor_flops(h, d, rank) / ffn_flops(h, d),
        }
        out.append(row)
        print(
            f"{'' if p is None else f'{p:g}':>5} {rank:>4} {s:>8.1%} | {row['dense_us']:>8.1f} "
            f"{row['predictor_us']:>8.1f} {row['sparse_us']:>9.1f} {row['net_us']:>8.1f} {row['limit_us']:>8.1f} | "
            f"{row['net_speedup']:>11.2f}× {row['limit_speedup']:>5.2f}× {1 / (1 - s):>6.2f}× "
            f"{row['flops_ratio']:>14.1%}"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
