"""Peak host memory while `load_model` loads a model: the resident set against the size of the weights.

    python benchmarks/load_memory.py --save /tmp/qwen-coder-1.5b-shaped     # a random model of that config
    python benchmarks/load_memory.py --model /tmp/qwen-coder-1.5b-shaped --device cpu --dtype bfloat16
    python benchmarks/load_memory.py --model smollm2-135m                    # the GGUF path (converted first)

`--save` writes a Qwen2.5-Coder-1.5B-shaped model (config of the real one, random weights) as bfloat16
safetensors with a byte-level tokenizer. A measurement runs `load_model` in a fresh process and reads its
peak resident set (VmHWM of /proc/self/status: anonymous and file-backed pages, the memory-mapped weights
included) after the imports, after the load, and after one byte of every page of the weights was read (pages
of a memory-mapped file count only once touched: the figure a forward would see); acceptance (issue 25): that
peak ≤ 1.2 × the weights' bytes.
A GGUF model is converted (streamed, tensor by tensor) in that process too where its cache is cold.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

QWEN_CODER_1_5B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
"""The configuration of Qwen/Qwen2.5-Coder-1.5B (its config.json)."""

MEASURE = """
import json, sys, torch, transformers
from actsparse.models.loading import load_model
def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
imports = peak()
model, _ = load_model(sys.argv[1], dtype=sys.argv[2], device=sys.argv[3])
weights = sum(p.numel() * p.element_size() for p in model.parameters())
loaded = peak()
for p in model.parameters():  # one byte of every page: memory-mapped weights become resident, as in a forward
    p.detach().reshape(-1).view(torch.uint8)[::4096].sum()
print(json.dumps({"imports": imports, "loaded": loaded, "peak": peak(), "weights": weights}))
"""


def save(folder: str) -> None:
    """A random Qwen2.5-Coder-1.5B-shaped model in bfloat16 (built in bfloat16: 3 GB, not 6), and a tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from actsparse.speed.benchmarking import byte_tokenizer

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN_CODER_1_5B))
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    print(f"saved a random Qwen2.5-Coder-1.5B-shaped model (bfloat16) in {folder}")


def measure(model: str, dtype: str, device: str) -> dict:
    """Peak resident bytes of a fresh process after its imports and after `load_model`, and the weights' bytes."""
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, model, dtype, device], capture_output=True, text=True, check=True
    )
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return row | {"ratio": round(row["peak"] / row["weights"], 3), "model": model, "dtype": dtype, "device": device}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save", metavar="FOLDER", help="only save the Qwen2.5-Coder-1.5B-shaped random model there")
    parser.add_argument("--model", help="what to load: a folder, a .gguf file or an alias")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-ratio", type=float, default=1.2, help="check: peak ≤ this × the weights' bytes")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    if args.save:
        save(args.save)
        return 0
    if not args.model:
        parser.error("give --model (or --save)")
    row = measure(args.model, args.dtype, args.device)
    gb = 2**30
    print(
        f"{args.model} ({args.dtype} on {args.device}): weights {row['weights'] / gb:.2f} GiB, peak resident set "
        f"{row['peak'] / gb:.2f} GiB with every weight read ({row['imports'] / gb:.2f} GiB after the imports, "
        f"{row['loaded'] / gb:.2f} GiB after the load): {row['ratio']:.3f}× the weights (limit {args.max_ratio}×)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(row, f, indent=1)
    return 0 if row["ratio"] <= args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
