"""`actsparse bench`: decode speed of the sparse kernels, dense vs sparse, timed back to back.

Three ops, each at sparsities 0, .25, .5, .7, .9: `gemv` (one weight matrix, out × in, the sparse
kernel on a pre-sparsified input), `ffn` (a whole gated FFN with `all_inputs` sparsity: the
threshold rule on the input and the intermediate, then the sparse products) and `decode` (tokens/s
of greedy decoding of a model under `accelerate` with calibrated `all_inputs` thresholds). Weights
rotate over copies filling `--working-set` MB so that they stream from memory as in decoding. The
dense and sparse variants alternate within one run (call by call on CPU) and each keeps the lower
quartile of its times, so that the ratio holds on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SPARSITIES = (0.0, 0.25, 0.5, 0.7, 0.9)
GEMV_SHAPES = ("14336x4096", "4096x14336", "28672x8192", "1536x576", "576x1536")
"""out × in, as in nn.Linear: Llama-3-8B up/gate and down, Llama-3-70B up/gate, SmolLM2-135M."""
FFN_SHAPES = ("4096x14336", "8192x28672", "576x1536")
"""h × d of whole FFNs: Llama-3-8B, Llama-3-70B, SmolLM2-135M."""
SMALL = ("1536x576", "576x1536")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="decode speed of sparse kernels and accelerate(), dense vs sparse")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench flags (shared with benchmarks/decode_speed.py)."""
    from actsparse.placement import add_placement_arguments

    add_placement_arguments(p)
    p.add_argument("--ops", default="gemv,ffn,decode", help="comma list of gemv, ffn, decode")
    p.add_argument(
        "--shapes", help="comma list of OUTxIN GEMV shapes, or 'all' (default: all on cuda, SmolLM2's on cpu)"
    )
    p.add_argument(
        "--ffn-shapes", help="comma list of HxD FFN shapes, or 'all' (default: all on cuda, SmolLM2's on cpu)"
    )
    p.add_argument("--sparsities", default=",".join(f"{s:g}" for s in SPARSITIES), help="comma list in [0, 1)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of the timed calls (and of decode runs)")
    p.add_argument("--iters", type=int, default=0, help="calls per repeat (default: chosen per shape)")
    p.add_argument("--working-set", type=float, default=256.0, help="MB of weight copies to rotate over")
    p.add_argument("--decode-tokens", type=int, default=16, help="greedy tokens per decode repeat")
    p.add_argument("--model", default="smollm2-135m", help="model of the decode op on cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, help="write the records here")


# --- timing ---------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _low(times: list[float]) -> float:
    """The lower quartile: robust to the preemptions of a shared machine, not to one lucky call."""
    ordered = sorted(times)
    return ordered[len(ordered) // 4]


def time_pair(
    dense: Callable[[int], Any], sparse: Callable[[int], Any], device: str, repeats: int, iters: int
) -> tuple[float, float, str]:
    """µs per call of dense(i) and sparse(i), i = call counter, timed back to back, and how they were timed.

    On CPU each call is timed alone, dense and sparse alternating call by call, and each keeps the
    lower quartile of its `repeats`·`iters` times ('cpu'). On CUDA, `iters` calls are captured in a
    CUDA graph and replays alternate, best replay kept ('cuda-graph': kernel time without Python's
    launch overhead, as a decode loop under CUDA graphs sees it); where capture fails, blocks of
    `iters` eager calls, best block ('cuda-eager').
    """
    for fn in (dense, sparse):  # warm up
        for i in range(min(iters, 3)):
            fn(i)
    if device == "cpu":
        times: list[list[float]] = [[], []]
        for i in range(repeats * iters):
            for slot, fn in enumerate((dense, sparse)):
                start = time.perf_counter()
                fn(i)
                times[slot].append((time.perf_counter() - start) * 1e6)
        return _low(times[0]), _low(times[1]), "cpu"
    try:
        graphs = [_cuda_graph(fn, iters) for fn in (dense, sparse)]
    except Exception:  # any capture failure: time eagerly instead
        graphs = None
    best = [math.inf, math.inf]
    for _ in range(repeats):
        for slot, fn in enumerate((dense, sparse)):
            if graphs is not None:
                best[slot] = min(best[slot], _replay_us(graphs[slot]) / iters)
                continue
            _sync(device)
            start = time.perf_counter()
            for i in range(iters):
                fn(i)
            _sync(device)
            best[slot] = min(best[slot], (time.perf_counter() - start) / iters * 1e6)
    return best[0], best[1], "cuda-eager" if graphs is None else "cuda-graph"


def _cuda_graph(fn: Callable[[int], Any], iters: int):
    """`iters` calls of fn captured in one CUDA graph (after a warm-up on a side stream)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(iters):  # every call once: lazy set-up (kernel builds, cached constants) stays out of the graph
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fn(i)
    return graph


def _replay_us(graph) -> float:
    """µs of one replay of `graph`, by CUDA events."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def _record(
    device: str, dtype: str, shape: str, op: str, s: float, dense_us: float, sparse_us: float, timing: str = ""
) -> dict:
    return {
        "device": device,
        "dtype": dtype,
        "shape": shape,
        "op": op,
        "sparsity": s,
        "dense_us": round(dense_us, 2),
        "sparse_us": round(sparse_us, 2),
        "speedup": round(dense_us / sparse_us, 3),
        "limit": round(1 / (1 - s), 3),
        "timing": timing,
    }


def _parse_shape(text: str) -> tuple[int, int]:
    a, b = text.lower().replace("×", "x").split("x")
    return int(a), int(b)


def _copies(nbytes: int, working_set_mb: float) -> int:
    return max(1, min(64, math.ceil(working_set_mb * 2**20 / nbytes)))


def _sparse_input(x, s: float):
    """x with its smallest-|x| fraction `s` of entries (per row) set to zero."""
    import torch

    n = x.shape[-1]
    drop = round(s * n)
    if drop == 0:
        return x
    idx = x.abs().topk(drop, dim=-1, largest=False).indices
    return x.scatter(-1, idx, torch.zeros_like(x))


# --- ops ------------------------------------------------------------------------------------------


def gemv_operands(shape: str, device: str, dtype, working_set_mb: float, batch: int = 1):
    """Copies of a random out × in weight filling `working_set_mb` (so that they stream from memory), their
    transposes laid out for the sparse kernels, and an input x [batch, in]."""
    import torch

    out_f, in_f = _parse_shape(shape)
    n = _copies(out_f * in_f * dtype.itemsize, working_set_mb)
    weights = [torch.randn(out_f, in_f, device=device, dtype=dtype) / math.sqrt(in_f) for _ in range(n)]
    weights_t = [w.t().contiguous() for w in weights]
    return weights, weights_t, torch.randn(batch, in_f, device=device, dtype=dtype)


def bench_gemv(shape: str, sparsities, device: str, dtype, args) -> list[dict]:
    """Dense `F.linear(x, W)` vs `masked_rows_matmul(x, keep, Wᵀ)` for one out × in matrix."""
    from torch.nn import functional as F

    from actsparse.kernels.sparse_ffn import masked_rows_matmul

    weights, weights_t, x = gemv_operands(shape, device, dtype, args.working_set)
    n, (out_f, in_f) = len(weights), weights[0].shape
    iters = args.iters or max(2 * n, min(200, int(2e8 / (out_f * in_f))))
    records = []
    for s in sparsities:
        xs = _sparse_input(x, s)
        keep = xs != 0

        def dense(i: int):
            return F.linear(x, weights[i % n])

        def sparse(i: int, xs=xs, keep=keep):
            return masked_rows_matmul(xs, keep, weights_t[i % n])

        dense_us, sparse_us, timing = time_pair(dense, sparse, device, args.repeats, iters)
        dtype_name = str(dtype).removeprefix("torch.")
        records.append(_record(device, dtype_name, shape, "gemv", s, dense_us, sparse_us, timing))
    return records


def bench_ffn(shape: str, sparsities, device: str, dtype, args) -> list[dict]:
    """Dense gated FFN vs `accelerate`'s decode step (threshold rule on input and intermediate, counted;
    the fused C kernel on CPU in float32 when it compiled)."""
    import torch
    from torch.nn import functional as F

    from actsparse.accelerate import DecodeStep
    from actsparse.adapters import GatedWeights
    from actsparse.calibrate import quantile_threshold
    from actsparse.instrument import TokenContext
    from actsparse.spec import SparsitySpec
    from actsparse.stats import SparsityStats

    h, d = _parse_shape(shape)
    n = _copies(3 * h * d * dtype.itemsize, args.working_set)

    def make() -> GatedWeights:
        gate, up = (torch.randn(d, h, device=device, dtype=dtype) / math.sqrt(h) for _ in range(2))
        down = torch.randn(h, d, device=device, dtype=dtype) / math.sqrt(d)
        return GatedWeights(gate, up, down, F.silu)

    dense = [make() for _ in range(n)]
    x = torch.randn(1, h, device=device, dtype=dtype)
    i_dense = F.silu(F.linear(x, dense[0].gate)) * F.linear(x, dense[0].up)
    iters = args.iters or max(2 * n, min(100, int(1e8 / (3 * h * d))))

    def dense_ffn(i: int):
        w = dense[i % n]
        return F.linear(F.silu(F.linear(x, w.gate)) * F.linear(x, w.up), w.down)

    tokens = TokenContext()
    tokens.phase = "decode"
    records = []
    for s in sparsities:
        taus = {"input": quantile_threshold(x.abs(), s), "intermediate": quantile_threshold(i_dense.abs(), s)}
        spec = SparsitySpec("all_inputs", "threshold", {0: taus})
        stats = SparsityStats(spec.vectors)
        steps = [DecodeStep(spec, 0, w, tokens, stats) for w in dense]  # as `accelerate` runs each FFN

        def sparse_step(i: int, steps=steps):
            return steps[i % n](x)

        dense_us, sparse_us, timing = time_pair(dense_ffn, sparse_step, device, args.repeats, iters)
        dtype_name = str(dtype).removeprefix("torch.")
        records.append(_record(device, dtype_name, f"ffn {shape}", "ffn", s, dense_us, sparse_us, timing))
    return records


def _decode_loop(model, prompt, tokens: int) -> list[float]:
    """µs of each greedy decode step after a prefill of `prompt` (the prefill is not timed)."""
    out = model(prompt, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(tokens):
        _sync(prompt.device.type)
        start = time.perf_counter()
        out = model(token, cache=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(prompt.device.type)
        times.append((time.perf_counter() - start) * 1e6)
    return times


def _llama3_8b_shaped(device: str, dtype):
    """A Llama-3-8B-shaped model with random weights (32 layers, h 4096, d 14336)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=2048,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model


def bench_decode(sparsities, device: str, dtype, args) -> list[dict]:
    """Tokens/s of greedy decoding, dense vs `accelerate` with calibrated all_inputs thresholds."""
    import torch

    from actsparse.accelerate import accelerate
    from actsparse.calibrate import calibrate, calibration_batches, calibration_text
    from actsparse.loading import load_model
    from actsparse.spec import SparsitySpec

    if device == "cuda":
        name, model = "llama3-8b-shaped (random)", _llama3_8b_shaped(device, dtype)
        generator = torch.Generator().manual_seed(0)
        batches = [{"input_ids": torch.randint(0, model.config.vocab_size, (2, 256), generator=generator)}]
        prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=generator).to(device)
    else:
        name = args.model
        model, tokenizer = load_model(args.model, dtype=dtype, device=device)
        batches = list(calibration_batches(tokenizer, calibration_text(), tokens=1024, seq_len=512))
        prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"].to(device)
    records = []
    with torch.no_grad():
        for s in sparsities:
            spec = SparsitySpec("all_inputs", "threshold", calibrate(model, batches, "all_inputs", s))
            times: list[list[float]] = [[], []]
            for _ in range(args.repeats):
                times[0] += _decode_loop(model, prompt, args.decode_tokens)
                with accelerate(model, spec):
                    times[1] += _decode_loop(model, prompt, args.decode_tokens)
            dense_us, sparse_us = _low(times[0]), _low(times[1])
            timing = "cuda-eager" if device == "cuda" else "cpu"
            record = _record(device, str(dtype).removeprefix("torch."), name, "decode", s, dense_us, sparse_us, timing)
            record["dense_tokens_per_s"] = round(1e6 / dense_us, 2)
            record["sparse_tokens_per_s"] = round(1e6 / sparse_us, 2)
            records.append(record)
    return records


# --- command --------------------------------------------------------------------------------------


def _list(text: str | None, all_values: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
    if text is None:
        return default
    return all_values if text == "all" else tuple(t.strip() for t in text.split(",") if t.strip())


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from actsparse.placement import device_kind, from_args

    where = from_args(args)  # a bad --device or --dtype, or cuda without a GPU: exit 2 before any work
    if where.device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(where.device))  # the ops below run on "cuda", the current device
    device, dtype = device_kind(where.device), where.torch_dtype
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if any(not 0.0 <= s < 1.0 for s in sparsities):
        raise ValueError("sparsities must lie in [0, 1)")
    ops = [op.strip() for op in args.ops.split(",")]
    unknown = set(ops) - {"gemv", "ffn", "decode"}
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; choose from gemv, ffn, decode")
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cpu = device == "cpu"
    shapes = _list(args.shapes, GEMV_SHAPES, SMALL if on_cpu else GEMV_SHAPES)
    ffn_shapes = _list(args.ffn_shapes, FFN_SHAPES, ("576x1536",) if on_cpu else FFN_SHAPES)

    console = Console() if sys.stdout.isatty() else Console(width=160)  # a log keeps whole rows
    records: list[dict] = []
    torch.manual_seed(0)
    with torch.no_grad():
        if "gemv" in ops:
            for shape in shapes:
                with console.status(f"gemv {shape}"):
                    records += bench_gemv(shape, sparsities, device, dtype, args)
        if "ffn" in ops:
            for shape in ffn_shapes:
                with console.status(f"ffn {shape}"):
                    records += bench_ffn(shape, sparsities, device, dtype, args)
    if "decode" in ops:
        with console.status("end-to-end decode"):
            records += bench_decode(sparsities, device, dtype, args)

    threads = torch.get_num_threads() if on_cpu else None
    title = f"decode speed on {device} ({dtype}" + (f", {threads} threads)" if threads else ")")
    table = Table(title=title)
    for column in ("op", "shape", "sparsity", "dense µs", "sparse µs", "speed-up", "1/(1−s)", "timing"):
        table.add_column(column, justify="left" if column in ("op", "shape") else "right")
    for r in records:
        table.add_row(
            r["op"],
            r["shape"],
            f"{r['sparsity']:.2f}",
            f"{r['dense_us']:.1f}",
            f"{r['sparse_us']:.1f}",
            f"{r['speedup']:.2f}×",
            f"{r['limit']:.2f}×",
            r["timing"],
        )
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0
