"""Greedy CPU decode of one model by llama.cpp and by actsparse, dense and sparse, in one run: ms per token.

    python benchmarks/llamacpp_compare.py [--model smollm2-135m] [--threads 2] [--tokens 32] [--rounds 5]
                                          [--sparsity 0.5] [--json PATH]

llama.cpp (llama-cpp-python) decodes the model's GGUF re-quantized to Q8_0, Q4_1, BF16 and F32 (made once
with llama-cpp-python's quantize, `allow_requantize`, into $ACTSPARSE_CACHE/llamacpp; from a Q4_1 GGUF the
others hold its dequantised values, as actsparse's float32 does). actsparse decodes with `StaticDecoder` in
float32, bfloat16 and int8 weights (`kernels.int8`): dense (the model's own FFN, and the fused kernel with
nothing dropped) and under `accelerate` at the same nominal `all_inputs` sparsity with calibrated thresholds
and with top-k. Every variant runs the same prompt, the same number of tokens and threads; one round runs
each variant once, the order rotating from round to round, so that a busy machine's load falls on all of
them alike. Printed: median and min over rounds of ms per token, the ratio to llama.cpp Q8_0's median, the
measured decode sparsity, and the load average before and after.

llama-cpp-python is a benchmark-only extra, in neither the package's dependencies nor `make test`:
`pip install llama-cpp-python` compiles llama.cpp (about 15 minutes on 2 cores). Without it the llama.cpp
rows are skipped (and said so).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

LLAMA_FORMATS = {"Q8_0": 7, "Q4_1": 3, "BF16": 32, "F32": 0}
"""llama.cpp's file types (`LLAMA_FTYPE_MOSTLY_*`) of the files compared."""

PROMPT = "The capital of France is"


def llamacpp() -> Any | None:
    """The llama_cpp module, or None when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def llama_files(source: Path, cache: Path, formats: list[str], threads: int) -> dict[str, Path]:
    """`source` re-quantized to each of `formats` in `cache` (made once, kept)."""
    lib = llamacpp()
    assert lib is not None
    cache.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in formats:
        path = cache / f"{source.stem}.{name}.gguf"
        if not path.exists():
            params = lib.llama_model_quantize_default_params()
            params.ftype = LLAMA_FORMATS[name]
            params.allow_requantize = True
            params.nthread = threads
            partial = path.with_suffix(".partial")
            if lib.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
                raise RuntimeError(f"llama.cpp could not quantize {source} to {name}")
            partial.replace(path)
        files[name] = path
    return files


class LlamaRun:
    """Greedy decode of one GGUF file by llama.cpp: prompt, then `tokens` steps of eval + argmax (timed)."""

    def __init__(self, path: Path, threads: int, context: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=context, verbose=False)

    def __call__(self, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
        import numpy as np

        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        out = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
        start = time.perf_counter()
        for _ in range(tokens):
            llm.eval([out[-1]])
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        return (time.perf_counter() - start) / tokens * 1e3, out


class ActsparseRun:
    """Greedy decode by `StaticDecoder` inside `block()` (None or an `accelerate` block): ms per token of the
    steps after the prefill, and the decode sparsity the block counted."""

    def __init__(self, model: Any, weights: str, block: Callable[[], AbstractContextManager[Any]]):
        from actsparse.speed.decoding import StaticDecoder

        self.decoder = StaticDecoder(model, weights=weights)
        self.block = block
        self.seen = [0.0, 0.0]  # decode entries zeroed, seen

    def __call__(self, prompt: list[int], tokens: int) -> tuple[float, list[int]]:
        import torch

        ids = torch.tensor([prompt])
        with self.block() as stats:
            token = self.decoder.prefill(ids, tokens + 1)
            out = [int(token)]
            start = time.perf_counter()
            for _ in range(tokens):
                token = self.decoder.step(token)
                out.append(int(token))
            ms = (time.perf_counter() - start) / tokens * 1e3
            if stats is not None:
                counts = [c for k, c in stats.counts().items() if k[2] == "decode"]
                self.seen[0] += sum(float(c[0]) for c in counts)
                self.seen[1] += sum(float(c[2]) for c in counts)
        return ms, out

    @property
    def sparsity(self) -> float | None:
        return self.seen[0] / self.seen[1] if self.seen[1] else None


def actsparse_runs(args: argparse.Namespace) -> tuple[dict[tuple[str, str, str], ActsparseRun], list[int]]:
    """The actsparse variants (engine, weights, mode) → run, and the prompt's token ids."""
    import torch

    from actsparse.models.loading import load_model
    from actsparse.sparsity.spec import SparsitySpec
    from actsparse.speed.accelerate import accelerate
    from actsparse.speed.calibrate import calibrate, calibration_batches, calibration_text

    runs: dict[tuple[str, str, str], ActsparseRun] = {}
    prompt: list[int] = []
    s = args.sparsity
    for dtype, all_names in ((torch.float32, ("float32", "int8")), (torch.bfloat16, ("bfloat16",))):
        names = [name for name in all_names if name in args.weights]
        if not names:
            continue
        model, tokenizer = load_model(args.model, dtype=dtype, device="cpu")
        prompt = tokenizer(PROMPT)["input_ids"]
        batches = list(calibration_batches(tokenizer, calibration_text(), tokens=1024, seq_len=512))
        with torch.no_grad():
            taus = calibrate(model, batches, "all_inputs", s)
        no_drop = {layer: dict.fromkeys(t, 0.0) for layer, t in taus.items()}
        specs = {
            "dense (kernel)": SparsitySpec("all_inputs", "threshold", no_drop),
            f"threshold {s:.0%}": SparsitySpec("all_inputs", "threshold", taus),
            f"top_k {s:.0%}": SparsitySpec("all_inputs", "top_k", 1.0 - s),
        }
        for name in names:
            weights = "int8" if name == "int8" else "float"
            if weights == "float":
                runs[("actsparse", name, "dense (torch FFN)")] = ActsparseRun(model, weights, lambda: nullcontext(None))
            for mode, spec in specs.items():

                def block(model=model, spec=spec, weights=weights) -> AbstractContextManager[Any]:
                    return accelerate(model, spec, weights=weights)

                runs[("actsparse", name, mode)] = ActsparseRun(model, weights, block)
    return runs, prompt


def summary(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="an actsparse model alias or .gguf file")
    parser.add_argument("--threads", type=int, default=2, help="threads of both engines")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens timed per run (after the prompt)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each runs every variant once")
    parser.add_argument("--sparsity", type=float, default=0.5, help="nominal all_inputs sparsity of the sparse rows")
    parser.add_argument("--llama", default=",".join(LLAMA_FORMATS), help="comma list of llama.cpp formats")
    parser.add_argument("--no-actsparse", action="store_true", help="time llama.cpp only")
    parser.add_argument(
        "--weights", default="float32,bfloat16,int8", help="comma list of actsparse weights: float32, bfloat16, int8"
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    formats = [f for f in args.llama.split(",") if f]
    if unknown := set(formats) - set(LLAMA_FORMATS):
        parser.error(f"unknown llama.cpp formats {sorted(unknown)}; choose from {', '.join(LLAMA_FORMATS)}")
    args.weights = [w for w in args.weights.split(",") if w]
    if unknown := set(args.weights) - {"float32", "bfloat16", "int8"}:
        parser.error(f"unknown actsparse weights {sorted(unknown)}; choose from float32, bfloat16, int8")
    if not 0.0 < args.sparsity < 1.0 or args.tokens < 1 or args.rounds < 1 or args.threads < 1:
        parser.error("--sparsity in (0, 1), --tokens, --rounds and --threads at least 1")

    import torch

    from actsparse.models.loading import resolve
    from actsparse.speed.benchmarking import load_average
    from actsparse.speed.kernels.cbuild import cache_dir

    torch.set_num_threads(args.threads)
    load_before = load_average()
    runs: dict[tuple[str, str, str], Any] = {}
    prompt: list[int] = []
    if not args.no_actsparse:
        runs, prompt = actsparse_runs(args)
    if formats and llamacpp() is None:
        print(
            "llama-cpp-python is not installed: the llama.cpp rows are skipped "
            "(pip install llama-cpp-python compiles llama.cpp, about 15 minutes on 2 cores)",
            file=sys.stderr,
        )
    elif formats:
        kind, source = resolve(args.model)
        if kind != "gguf" or source is None:
            print(f"{args.model} is not a GGUF model: the llama.cpp rows are skipped", file=sys.stderr)
        else:
            files = llama_files(source, cache_dir() / "llamacpp", formats, args.threads)
            if not prompt:
                from actsparse.models.loading import load_model

                prompt = load_model(args.model, device="cpu")[1](PROMPT)["input_ids"]
            for name, path in files.items():
                runs[("llama.cpp", name, "dense")] = LlamaRun(path, args.threads, len(prompt) + args.tokens + 8)
    if not runs:
        print("nothing to time", file=sys.stderr)
        return 2
    keys = list(runs)
    times: dict[tuple[str, str, str], list[float]] = {k: [] for k in keys}
    texts: dict[tuple[str, str, str], list[int]] = {}
    for key in keys:  # warm-up: kernels built, weights quantized, files mapped
        runs[key](prompt, 2)
    for r in range(args.rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            ms, texts[key] = runs[key](prompt, args.tokens)
            times[key].append(ms)
    reference = ("llama.cpp", "Q8_0", "dense")
    ref_ms = statistics.median(times[reference]) if reference in times else None
    rows = []
    for key in keys:
        median, best = summary(times[key])
        sparsity = getattr(runs[key], "sparsity", None)
        rows.append(
            {
                "engine": key[0],
                "weights": key[1],
                "mode": key[2],
                "ms_per_token_median": round(median, 2),
                "ms_per_token_min": round(best, 2),
                "speedup_vs_llamacpp_q8_0": round(ref_ms / median, 3) if ref_ms else None,
                "measured_sparsity": None if sparsity is None else round(sparsity, 4),
                "tokens": texts[key],
            }
        )
    load_after = load_average()
    print(
        f"greedy decode of {args.model}, {args.tokens} tokens after a {len(prompt)}-token prompt, {args.threads} "
        f"threads, {args.rounds} rounds (order rotating); load average {load_before} before, {load_after} after"
    )
    header = f"{'engine':10} {'weights':9} {'mode':18} {'median ms':>9} {'min ms':>7} {'× Q8_0':>7} {'sparsity':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = row["speedup_vs_llamacpp_q8_0"]
        sparsity = row["measured_sparsity"]
        print(
            f"{row['engine']:10} {row['weights']:9} {row['mode']:18} {row['ms_per_token_median']:9.2f} "
            f"{row['ms_per_token_min']:7.2f} {'-' if ratio is None else f'{ratio:.2f}×':>7} "
            f"{'-' if sparsity is None else f'{sparsity:.3f}':>8}"
        )
    if ref_ms is None:
        print("(× Q8_0: no llama.cpp Q8_0 row in this run)")
    if args.json:
        args.json.write_text(json.dumps({"load": [load_before, load_after], "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
