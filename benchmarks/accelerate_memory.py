"""Peak memory inside `accelerate` against outside it: greedy decode of a model, dense then accelerated.

    python benchmarks/accelerate_memory.py [--model smollm2-135m] [--rule threshold|top_k] [--tokens 16]
    python benchmarks/accelerate_memory.py --device cuda --random-8b      # Llama-3-8B-shaped, random
    python benchmarks/accelerate_memory.py --random tiny-llama-shaped     # its tiny twin (the GPU check's dry run)

CPU: the peak resident set (VmHWM of /proc/self/status, reset through /proc/self/clear_refs between the
phases) of a dense greedy decode, then of the same decode under `accelerate` (entry, re-layout, decode,
exit), twice. CUDA: torch.cuda.max_memory_allocated of each phase. Prints both peaks and their ratio
(acceptance: ≤ 1.05), and the weights' bytes, for scale.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from actsparse import SparsitySpec, accelerate
from actsparse.speed.benchmarking import RANDOM_SHAPES, decode_loop, load_average, random_llama


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set


def _peak(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _peak_rss_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--random", choices=RANDOM_SHAPES, help="a random model of this shape instead")
    parser.add_argument("--random-8b", action="store_true", help="--random llama3-8b-shaped")
    parser.add_argument("--layers", type=int, default=8, help="layers of the random model")
    parser.add_argument("--rule", choices=("threshold", "top_k"), default="top_k")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    random = "llama3-8b-shaped" if args.random_8b else args.random
    if random:
        model = random_llama(random, args.device, dtype, args.layers)
        prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    else:
        from actsparse.models.loading import load_model

        model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
        prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    prompt = prompt.to(args.device)
    if args.rule == "threshold":  # thresholds of about 50 %, uncalibrated: memory does not depend on them
        layers = range(model.config.num_hidden_layers)
        spec = SparsitySpec("all_inputs", "threshold", {i: {"input": 0.05, "intermediate": 0.01} for i in layers})
    else:
        spec = SparsitySpec("all_inputs", "top_k", 0.5)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        decode_loop(model, prompt, 2)  # warm up: lazy allocations outside both measurements
        _reset_peak(args.device)
        decode_loop(model, prompt, args.tokens)
        outside = _peak(args.device)
        inside = []
        for _ in range(2):  # the first block, and a second one (the allocator's state after the first)
            _reset_peak(args.device)
            with accelerate(model, spec):
                decode_loop(model, prompt, args.tokens)
            inside.append(_peak(args.device))
    row = {
        "device": args.device,
        "model": f"{random} (random)" if random else args.model,
        "rule": args.rule,
        "weights_mb": round(weights / 2**20, 1),
        "peak_outside_mb": round(outside / 2**20, 1),
        "peak_inside_mb": [round(b / 2**20, 1) for b in inside],
        "ratio": [round(b / outside, 4) for b in inside],
        "load": load_average(),
    }
    print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
