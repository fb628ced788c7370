"""Where a decode step's time goes: the FFNs' share, timed in place, dense and sparse (SmolLM2, CPU).

    python benchmarks/decode_breakdown.py [--sparsity 0.5] [--tokens 16] [--repeats 3] [--decoder generate|static]

Greedy decode at `--sparsity` on `all_inputs` (calibrated thresholds), interleaved token by token:
  dense_torch   the model's own FFNs (each FFN forward timed)
  dense_kernel  `accelerate` with τ = 0: the fused C kernel, nothing dropped (each kernel call timed)
  sparse        `accelerate` with the calibrated thresholds
Prints per step the wall-clock time, the FFNs' part of it and the rest (attention, LM head, Python), and the
end-to-end speed-up that a perfect sparse kernel (FFN time × (1 − measured sparsity)) would reach. With
`--decoder static` the steps run in `StaticDecoder`, whose fused attention kernel and LM head are timed too.
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch

from actsparse.models.loading import load_model
from actsparse.sparsity.spec import SparsitySpec
from actsparse.speed.accelerate import accelerate
from actsparse.speed.benchmarking import load_average, lower_quartile, prefill, timed_decoder_step, timed_step
from actsparse.speed.calibrate import calibrate, calibration_batches, calibration_text
from actsparse.speed.decoding import StaticDecoder
from actsparse.speed.kernels import attention_cpu, sparse_ffn_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decoder", choices=("generate", "static"), default="generate")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    batches = list(calibration_batches(tokenizer, calibration_text(), tokens=1024, seq_len=512))
    taus = calibrate(model, batches, "all_inputs", args.sparsity)
    spec = SparsitySpec("all_inputs", "threshold", taus)
    no_drop = SparsitySpec("all_inputs", "threshold", {layer: dict.fromkeys(t, 0.0) for layer, t in taus.items()})
    prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]

    seconds = {"ffn": 0.0, "attention": 0.0, "head": 0.0}
    mlp_class = type(model.get_decoder().layers[0].mlp)
    mlp_forward, kernel_call = mlp_class.forward, sparse_ffn_cpu.FusedFFN.__call__
    attention_call, head_call = attention_cpu.AttentionStep.__call__, attention_cpu.linear

    def timed(fn, part="ffn"):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            seconds[part] += time.perf_counter() - start
            return out

        return wrapper

    decoders: dict[str, StaticDecoder] = {}

    def start(key: str):
        if args.decoder == "generate":
            return prefill(model, prompt)
        decoders[key] = StaticDecoder(model)
        return decoders[key].prefill(prompt, args.tokens + 1)

    def advance(key: str, state):
        return timed_step(model, state) if args.decoder == "generate" else timed_decoder_step(decoders[key], state)

    variants = {
        "dense_torch": nullcontext,
        "dense_kernel": lambda: accelerate(model, no_drop),
        "sparse": lambda: accelerate(model, spec),
    }
    steps: dict[str, list[float]] = {k: [] for k in variants}
    ffns: dict[str, list[float]] = {k: [] for k in variants}
    attention: dict[str, list[float]] = {k: [] for k in variants}
    head: dict[str, list[float]] = {k: [] for k in variants}
    zeroed = seen = 0
    mlp_class.forward = timed(mlp_forward)  # type: ignore[method-assign]
    sparse_ffn_cpu.FusedFFN.__call__ = timed(kernel_call)  # type: ignore[method-assign]
    attention_cpu.AttentionStep.__call__ = timed(attention_call, "attention")  # type: ignore[method-assign]
    attention_cpu.linear = timed(head_call, "head")
    try:
        for _ in range(args.repeats):
            states = {}
            for key, block in variants.items():
                with block():
                    states[key] = start(key)
            for _ in range(args.tokens):
                for key, block in variants.items():
                    seconds.update(ffn=0.0, attention=0.0, head=0.0)
                    with block() as stats:
                        us, states[key] = advance(key, states[key])
                        if key == "sparse":
                            counts = [c for k, c in stats.counts().items() if k[2] == "decode"]
                            zeroed, seen = zeroed + sum(c[0] for c in counts), seen + sum(c[2] for c in counts)
                    steps[key].append(us / 1e3)
                    ffns[key].append(seconds["ffn"] * 1e3)
                    attention[key].append(seconds["attention"] * 1e3)
                    head[key].append(seconds["head"] * 1e3)
    finally:
        mlp_class.forward = mlp_forward  # type: ignore[method-assign]
        sparse_ffn_cpu.FusedFFN.__call__ = kernel_call  # type: ignore[method-assign]
        attention_cpu.AttentionStep.__call__ = attention_call  # type: ignore[method-assign]
        attention_cpu.linear = head_call
    # dense_torch's FFN time includes its module call; the kernels' excludes `accelerate`'s Python around them;
    # attention and head are the static decoder's C kernels (0 in transformers' loop, whose attention is in "rest")
    s = zeroed / max(seen, 1)
    print(
        f"{args.model}, float32, {torch.get_num_threads()} threads, all_inputs at {args.sparsity:g} (measured {s:.3f})"
    )
    print(f"{args.decoder} loop")
    print(f"{'variant':>13} | {'step ms':>8} {'FFN ms':>8} {'attn ms':>8} {'head ms':>8} {'rest ms':>8}")
    row = {}
    for key in variants:
        step, ffn = lower_quartile(steps[key]), lower_quartile(ffns[key])
        att, lm = lower_quartile(attention[key]), lower_quartile(head[key])
        row[key] = (step, ffn)
        print(f"{key:>13} | {step:8.1f} {ffn:8.1f} {att:8.1f} {lm:8.1f} {step - ffn - att - lm:8.1f}")
    best = min(variants, key=lambda k: row[k][0] if k != "sparse" else float("inf"))
    step, ffn = row[best]
    print(f"sparse FFN vs {best}'s: {ffn / row['sparse'][1]:.2f}x (limit {1 / (1 - s):.2f}x)")
    print(f"end to end: {step / row['sparse'][0]:.3f}x; a perfect kernel: {step / (step - ffn + ffn * (1 - s)):.3f}x")
    print(f"load average {load_average()}")


if __name__ == "__main__":
    main()
