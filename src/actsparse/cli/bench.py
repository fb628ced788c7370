"""`actsparse bench`: decode speed of the sparse kernels, dense vs sparse, timed back to back.

Three ops, each at sparsities 0, .25, .5, .7, .9: `gemv` (one weight matrix, out × in, the sparse
kernel on a pre-sparsified input), `ffn` (a whole gated FFN with `all_inputs` sparsity: the
threshold rule on the input and the intermediate, then the sparse products) and `decode` (tokens/s
of greedy decoding of a model under `accelerate` with calibrated `all_inputs` thresholds, and with
top-k at the same nominal sparsity). Weights rotate over copies filling `--working-set` MB so that
they stream from memory as in decoding. All variants of one row run interleaved in one run (call by
call on CPU, wall clock) and each keeps the lower quartile of its times, so that the ratios hold on
a busy machine (whose load average is printed). Honest figures:
- dense = the faster of torch's own dense op and the same sparse kernel with nothing dropped;
- the sparsity measured (the counts of the run) beside the nominal one, and 1/(1 − measured);
- `limit`: a dense product over only the kept rows, gathered in advance (gemv, ffn), timed in the
  same run: what a perfect sparse kernel would take;
- `kernel`: the kernel that ran, checked by its call counter (fused-c, triton, pytorch).
The harness lives in `actsparse.speed.benchmarking`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actsparse.cli.common import comma_list, make_console

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
    from actsparse.models.placement import add_placement_arguments

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
    p.add_argument(
        "--model",
        help="decode op: alias, folder or .gguf file, or a random model: llama3-8b-shaped, tiny-llama-shaped "
        "(default: llama3-8b-shaped on cuda, smollm2-135m on cpu)",
    )
    p.add_argument("--rules", default="threshold,top_k", help="decode op: comma list of threshold, top_k")
    p.add_argument(
        "--decoder",
        choices=("auto", "static", "compiled", "generate"),
        default="auto",
        help="decode op: the loop of the sparse row: StaticDecoder (static), its step compiled whole, CUDA graphs "
        "on cuda (compiled), or transformers' forward (generate); auto: compiled on cuda, static on cpu, where the "
        "model allows; dense is the best of the loops timed",
    )
    p.add_argument(
        "--weights",
        choices=("float", "int8"),
        default="float",
        help="decode op: the weights the kernels read: the model's own, or int8 copies (blocks of 32 as llama.cpp's "
        "Q8_0; StaticDecoder only, dense is then the int8 kernels with nothing dropped)",
    )
    p.add_argument("--layers", type=int, default=32, help="decode op: layers of a random model")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, help="write the records here")


# --- ops ------------------------------------------------------------------------------------------


def _record(device: str, dtype, shape: str, op: str, s: float, us: dict[str, float], **extra) -> dict:
    """One row: the best dense (torch's or the kernel's with nothing dropped), sparse, limit and ratios."""
    from actsparse.speed.benchmarking import load_average

    dense_us = min(us.get("dense_torch", math.inf), us.get("dense_kernel", math.inf))
    measured = extra.pop("measured_sparsity", s)
    record = {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "shape": shape,
        "op": op,
        "sparsity": s,
        "measured_sparsity": round(measured, 4),
        "dense_us": round(dense_us, 2),
        "sparse_us": round(us["sparse"], 2),
        "speedup": round(dense_us / us["sparse"], 3),
        "limit": round(1 / (1 - s), 3),
        "ideal": round(1 / max(1 - measured, 1e-9), 3),
        **{f"{name}_us": round(value, 2) for name, value in us.items() if name != "sparse"},
        "load": load_average(),
        **extra,
    }
    if "limit" in us:
        record["limit_speedup"] = round(dense_us / us["limit"], 3)
    return record


def _kernel_calls() -> dict[str, int]:
    """Calls so far of the compiled kernels (fused C, Triton), to tell which one really ran."""
    from actsparse.speed.kernels import sparse_ffn_triton
    from actsparse.speed.kernels.attention_cpu import AttentionStep
    from actsparse.speed.kernels.sparse_ffn_cpu import FusedFFN

    return {"fused-c": FusedFFN.calls, "attention-c": AttentionStep.calls, "triton": sparse_ffn_triton.launches()}


def _ran(before: dict[str, int]) -> str:
    after = _kernel_calls()
    ran = [name for name in after if after[name] > before[name]]
    return "+".join(ran) or "pytorch"


def bench_gemv(shape: str, sparsities, device: str, dtype, args) -> list[dict]:
    """Dense `F.linear(x, W)` and the kernel keeping everything vs `masked_rows_matmul(x, keep, Wᵀ)`, and
    the limit: x's kept entries times the kept rows of Wᵀ, gathered beforehand."""
    import torch
    from torch.nn import functional as F

    from actsparse.speed.benchmarking import gemv_operands, sparse_input, time_calls
    from actsparse.speed.kernels import gather_gemv_triton
    from actsparse.speed.kernels.sparse_ffn import masked_rows_matmul

    weights, weights_t, x = gemv_operands(shape, device, dtype, args.working_set)
    n, (out_f, in_f) = len(weights), weights[0].shape
    iters = args.iters or max(2 * n, min(200, int(2e8 / (out_f * in_f))))
    everything = torch.ones_like(x, dtype=torch.bool)
    records = []
    for s in sparsities:
        xs = sparse_input(x, s)
        keep = xs != 0
        rows = keep.any(dim=0).nonzero().view(-1)
        x_kept, kept_t = xs[:, rows].contiguous(), [w[rows].contiguous() for w in weights_t]

        def sparse(i: int, xs=xs, keep=keep):
            return masked_rows_matmul(xs, keep, weights_t[i % n])

        def limit(i: int, xk=x_kept, kt=kept_t):
            return xk @ kt[i % n]

        def gather(i: int, xs=xs, keep=keep, s=s):
            return gather_gemv_triton.gather_rows_matmul(xs, weights_t[i % n], keep, kept_fraction=1 - s)

        fns: dict[str, Callable[[int], Any]] = {
            "dense_torch": lambda i: F.linear(x, weights[i % n]),
            "dense_kernel": lambda i: masked_rows_matmul(x, everything, weights_t[i % n]),
            "sparse": sparse,
            "limit": limit,
        }
        if device == "cuda" and gather_gemv_triton.available():  # the two-stage kernel, beside the default one
            fns["gather"] = gather
        before = _kernel_calls()
        us, timing = time_calls(fns, device, args.repeats, iters)
        measured = 1 - float(keep.float().mean())
        record = _record(
            device, dtype, shape, "gemv", s, us, measured_sparsity=measured, timing=timing, kernel=_ran(before)
        )
        if "gather" in us:
            record["gather_speedup"] = round(record["dense_us"] / us["gather"], 3)
        records.append(record)
    return records


def bench_ffn(shape: str, sparsities, device: str, dtype, args) -> list[dict]:
    """Dense gated FFN (torch's, and `accelerate`'s decode step with τ = 0) vs `accelerate`'s decode step
    (threshold rule on input and intermediate, counted; the fused C kernel on CPU when it compiled), and the
    limit: dense products over the kept rows only, gathered beforehand."""
    import torch
    from torch.nn import functional as F

    from actsparse.models.adapters import GatedWeights
    from actsparse.sparsity.instrument import TokenContext
    from actsparse.sparsity.spec import SparsitySpec
    from actsparse.sparsity.stats import SparsityStats
    from actsparse.speed.accelerate import DecodeStep
    from actsparse.speed.benchmarking import copies, parse_shape, time_calls
    from actsparse.speed.calibrate import quantile_threshold

    h, d = parse_shape(shape)
    n = copies(3 * h * d * dtype.itemsize, args.working_set)

    def make() -> GatedWeights:
        gate, up = (torch.randn(d, h, device=device, dtype=dtype) / math.sqrt(h) for _ in range(2))
        down = torch.randn(h, d, device=device, dtype=dtype) / math.sqrt(d)
        return GatedWeights(gate, up, down, F.silu)

    dense = [make() for _ in range(n)]
    x = torch.randn(1, h, device=device, dtype=dtype)
    iters = args.iters or max(2 * n, min(100, int(1e8 / (3 * h * d))))

    def dense_ffn(i: int):
        w = dense[i % n]
        return F.linear(F.silu(F.linear(x, w.gate)) * F.linear(x, w.up), w.down)

    tokens = TokenContext()
    tokens.phase = "decode"

    def steps_for(taus: dict[str, float]) -> tuple[list[DecodeStep], SparsityStats]:
        spec = SparsitySpec("all_inputs", "threshold", {0: taus})
        stats = SparsityStats(spec.vectors)
        return [DecodeStep(spec, 0, w, tokens, stats) for w in dense], stats  # as `accelerate` runs each FFN

    dense_steps, _ = steps_for({"input": 0.0, "intermediate": 0.0})
    records = []
    for s in sparsities:
        tau_in = quantile_threshold(x.abs(), s)
        keep_x = x.abs() > tau_in
        xm = torch.where(keep_x, x, 0)
        i_sparse = F.silu(F.linear(xm, dense[0].gate)) * F.linear(xm, dense[0].up)  # what the kernel masks
        tau_mid = quantile_threshold(i_sparse.abs(), s)
        steps, stats = steps_for({"input": tau_in, "intermediate": tau_mid})
        rows_x = keep_x[0].nonzero().view(-1)
        rows_i = (i_sparse.abs() > tau_mid)[0].nonzero().view(-1)
        x_kept = x[:, rows_x].contiguous()
        kept = [
            (w.gate[:, rows_x].t().contiguous(), w.up[:, rows_x].t().contiguous(), w.down[:, rows_i].t().contiguous())
            for w in dense
        ]

        def limit(i: int, kept=kept, x_kept=x_kept, rows_i=rows_i):
            g_t, u_t, d_t = kept[i % n]
            return (F.silu(x_kept @ g_t) * (x_kept @ u_t))[:, rows_i] @ d_t

        def sparse_step(i: int, steps=steps):
            return steps[i % n](x)

        fns: dict[str, Callable[[int], Any]] = {
            "dense_torch": dense_ffn,
            "dense_kernel": lambda i: dense_steps[i % n](x),
            "sparse": sparse_step,
            "limit": limit,
        }
        before = _kernel_calls()
        us, timing = time_calls(fns, device, args.repeats, iters)
        counts = stats.counts()
        zeroed = sum(c[0] for c in counts.values())
        seen = sum(c[2] for c in counts.values())
        records.append(
            _record(
                device,
                dtype,
                f"ffn {shape}",
                "ffn",
                s,
                us,
                measured_sparsity=zeroed / max(seen, 1),
                timing=timing,
                kernel=_ran(before),
            )
        )
    return records


def bench_decode(sparsities, device: str, dtype, args) -> list[dict]:
    """Tokens/s of greedy decoding: dense (the model's own FFNs, and `accelerate` with τ = 0) vs `accelerate` with
    calibrated all_inputs thresholds and with top-k at the same nominal sparsity, interleaved token by token
    (each variant keeps its own cache; its `accelerate` block is entered around each of its steps, untimed).
    Each variant runs in transformers' forward (`generate`) and, where the model's layout allows, in
    `StaticDecoder` (`static`: static cache, fused attention kernel) or in `CompiledDecoder` (`compiled`: the
    same step compiled whole, captured in CUDA graphs on CUDA; dense and sparse in that same loop). A row's dense
    time is the best dense of the loops; its sparse time is the last loop's (transformers' where no other can
    run), and every loop's own figures are kept beside it. The compiled step counts nothing: its measured
    sparsity is that of the same rule in transformers' forward."""
    from contextlib import nullcontext

    import torch

    from actsparse.models.loading import load_model
    from actsparse.sparsity.spec import SparsitySpec
    from actsparse.speed.accelerate import accelerate
    from actsparse.speed.benchmarking import (
        RANDOM_SHAPES,
        lower_quartile,
        prefill,
        random_batches,
        random_llama,
        timed_decoder_step,
        timed_step,
    )
    from actsparse.speed.calibrate import calibrate, calibration_batches, calibration_text
    from actsparse.speed.compiled import CompiledDecoder
    from actsparse.speed.decoding import StaticDecoder, UnsupportedModelError

    name = args.model or ("llama3-8b-shaped" if device == "cuda" else "smollm2-135m")
    if name in RANDOM_SHAPES:
        model = random_llama(name, device, dtype, args.layers)
        batches = random_batches(model.config.vocab_size)
        generator = torch.Generator().manual_seed(1)
        prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=generator).to(device)
        name += " (random)"
    else:
        model, tokenizer = load_model(name, dtype=dtype, device=device)
        batches = list(calibration_batches(tokenizer, calibration_text(), tokens=1024, seq_len=512))
        prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"].to(device)
    rules = comma_list(args.rules)
    unknown = set(rules) - {"threshold", "top_k"}
    if unknown:
        raise ValueError(f"unknown decode rules {sorted(unknown)}; choose from threshold, top_k")
    weights = getattr(args, "weights", "float")
    if weights == "int8" and args.decoder in ("generate", "compiled"):
        raise ValueError(f"--weights int8 runs in the static decoder only, not with --decoder {args.decoder}")
    loops = [] if weights == "int8" else ["generate"]  # int8: every weight of the step int8, in StaticDecoder
    if args.decoder != "generate":
        try:
            StaticDecoder(model, weights=weights)
            compiled = args.decoder == "compiled" or (
                args.decoder == "auto" and device == "cuda" and weights == "float"
            )
            loops.append("compiled" if compiled else "static")
        except UnsupportedModelError as err:
            if args.decoder in ("static", "compiled") or weights == "int8":
                raise
            print(f"static decoder: {err}; timing transformers' forward only", file=sys.stderr)
    length = prompt.shape[1] + args.decode_tokens + 4  # room for the decode tokens and the warm-up steps
    records = []
    with torch.no_grad():
        for s in sparsities:
            taus = calibrate(model, batches, "all_inputs", s)
            no_drop = {layer: dict.fromkeys(t, 0.0) for layer, t in taus.items()}  # the same kernels, all kept
            specs: dict[str, SparsitySpec | None] = {
                "dense_torch": None,
                "dense_kernel": SparsitySpec("all_inputs", "threshold", no_drop),
            }
            if weights == "int8":  # torch's FFN reads float weights: not a dense int8 decode
                del specs["dense_torch"]
            if "threshold" in rules:
                specs["threshold"] = SparsitySpec("all_inputs", "threshold", taus)
            if "top_k" in rules:
                specs["top_k"] = SparsitySpec("all_inputs", "top_k", 1.0 - s)
            variants = [(loop, key) for loop in loops for key in specs]
            times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
            seen = {v: [0.0, 0.0] for v in variants}  # decode entries zeroed, seen
            calls = {v: dict.fromkeys(_kernel_calls(), 0) for v in variants}
            decoders: dict[tuple[str, str], Any] = {
                v: StaticDecoder(model, weights=weights) for v in variants if v[0] == "static"
            }
            for v in variants:
                if v[0] == "compiled":  # compiled (and on CUDA captured) before the timing starts
                    decoders[v] = CompiledDecoder(model, specs[v[1]], length=length)
                    token = decoders[v].prefill(prompt, 3)
                    for _ in range(3):
                        token = decoders[v].step(token)

            def block(variant: tuple[str, str], specs=specs):
                spec = specs[variant[1]]  # the compiled step has its spec built in
                if spec is None or variant[0] == "compiled":
                    return nullcontext(None)
                return accelerate(model, spec, weights=weights)

            def step(variant, state, decoders=decoders):
                if variant[0] == "generate":
                    return timed_step(model, state)
                return timed_decoder_step(decoders[variant], state)

            for _ in range(args.repeats):  # token by token, every variant in turn: they share the machine's load
                states: dict[tuple[str, str], Any] = {}
                for v in variants:
                    with block(v):
                        if v[0] == "generate":
                            states[v] = prefill(model, prompt)
                        else:
                            states[v] = decoders[v].prefill(prompt, args.decode_tokens + 1)
                for _ in range(args.decode_tokens):
                    for v in variants:
                        before = _kernel_calls()
                        with block(v) as stats:
                            step_us, states[v] = step(v, states[v])
                        times[v].append(step_us)
                        for kernel, value in _kernel_calls().items():
                            calls[v][kernel] += value - before[kernel]
                        if stats is not None:
                            counts = [c for k, c in stats.counts().items() if k[2] == "decode"]
                            seen[v][0] += sum(c[0] for c in counts)
                            seen[v][1] += sum(c[2] for c in counts)
            us = {v: lower_quartile(t) for v, t in times.items()}
            sparse_loop = loops[-1]
            dense_keys: list[str] = [key for key in ("dense_torch", "dense_kernel") if key in specs]
            for rule in (r for r in rules if r in specs):
                row: dict[str, float] = {key: min(us[(loop, key)] for loop in loops) for key in dense_keys}
                row["sparse"] = us[(sparse_loop, rule)]
                extra = {f"{loop}_{key}_us": round(us[(loop, key)], 2) for loop in loops for key in (*dense_keys, rule)}
                best = min(((loop, key) for loop in loops for key in dense_keys), key=lambda v: us[v])
                z, n = seen[("generate" if sparse_loop == "compiled" else sparse_loop, rule)]
                ran = [k for k, c in calls[(sparse_loop, rule)].items() if c]
                if sparse_loop == "compiled":
                    ran = ["compiled"]  # the custom ops inside the graph (its replays run no Python to count)
                timing = "cuda-graph" if sparse_loop == "compiled" else "cuda-eager"
                record = _record(
                    device,
                    dtype,
                    f"{name} {rule} ({sparse_loop})",
                    "decode",
                    s,
                    row,
                    measured_sparsity=z / max(n, 1.0),
                    timing=timing if device == "cuda" else "cpu-wall",
                    kernel="+".join(ran) or "pytorch",
                    decoder=sparse_loop,
                    model=name,
                    rule=rule,
                    weights=weights,
                    dense_best=f"{best[1]} ({best[0]})",
                    **extra,
                )
                record["dense_tokens_per_s"] = round(1e6 / record["dense_us"], 2)
                record["sparse_tokens_per_s"] = round(1e6 / record["sparse_us"], 2)
                records.append(record)
    return records


# --- command --------------------------------------------------------------------------------------


def _list(text: str | None, all_values: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
    if text is None:
        return default
    return all_values if text == "all" else tuple(comma_list(text))


TABLE_COLUMNS = ("op", "shape", "s", "meas.", "dense", "sparse", "speed-up", "limit ×", "ideal", "kernel")
"""The compact table, whole at 100 columns: nominal and measured sparsity, the best dense and the sparse time (µs),
their ratio, that of the gathered limit (gemv, ffn) and the ideal 1/(1 − measured); the rest is in --json."""


def table_row(r: dict[str, Any]) -> tuple[str, ...]:
    """A record's cells under TABLE_COLUMNS; a decode row's shape is its rule (model and loop are in the title)."""
    return (
        r["op"],
        r.get("rule", r["shape"]) if r["op"] == "decode" else r["shape"],
        f"{r['sparsity']:.2f}",
        f"{r['measured_sparsity']:.3f}",
        f"{r['dense_us']:.1f}",
        f"{r['sparse_us']:.1f}",
        f"{r['speedup']:.2f}×",
        f"{r['limit_speedup']:.2f}×" if "limit_speedup" in r else "-",
        f"{r['ideal']:.2f}×",
        r["kernel"],
    )


def table(records: list[dict[str, Any]], title: str) -> Any:
    """The rich Table of `records`, without borders, so that it reads whole at 100 columns."""
    from rich.table import Table

    decode = sorted({f"{r['model']} ({r['decoder']} loop)" for r in records if "model" in r})
    grid = Table(title=f"{title}; times in µs" + (f"; decode: {', '.join(decode)}" if decode else ""), box=None)
    for column in TABLE_COLUMNS:
        grid.add_column(column, justify="left" if column in ("op", "shape", "kernel") else "right", no_wrap=True)
    for r in records:
        grid.add_row(*table_row(r))
    return grid


def run(args: argparse.Namespace) -> int:
    sparsities = [float(s) for s in args.sparsities.split(",")]
    if any(not 0.0 <= s < 1.0 for s in sparsities):
        raise ValueError("sparsities must lie in [0, 1)")
    ops = [op.strip() for op in args.ops.split(",")]
    unknown = set(ops) - {"gemv", "ffn", "decode"}
    if unknown:
        raise ValueError(f"unknown ops {sorted(unknown)}; choose from gemv, ffn, decode")
    import torch  # here: the checks above answer without it

    from actsparse.models.placement import device_kind, from_args

    where = from_args(args)  # a bad --device or --dtype, or cuda without a GPU: exit 2 before any work
    if where.device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(where.device))  # the ops below run on "cuda", the current device
    device, dtype = device_kind(where.device), where.torch_dtype
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cpu = device == "cpu"
    shapes = _list(args.shapes, GEMV_SHAPES, SMALL if on_cpu else GEMV_SHAPES)
    ffn_shapes = _list(args.ffn_shapes, FFN_SHAPES, ("576x1536",) if on_cpu else FFN_SHAPES)

    console = make_console()
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

    from actsparse.speed.benchmarking import load_average

    threads = torch.get_num_threads() if on_cpu else None
    title = f"decode speed on {device} ({str(dtype).removeprefix('torch.')}" + (
        f", {threads} threads" if threads else ""
    )
    console.print(table(records, f"{title}; load average {load_average()} at the end)"))
    if not args.json:
        console.print("each row's timing, load, loops and every time measured: --json FILE", highlight=False)
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0
