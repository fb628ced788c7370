"""Decode speed of the sparse kernels and of `accelerate`, dense vs sparse, measured in one run.

    python benchmarks/decode_speed.py [--device cpu|cuda] [--json PATH] [--shapes all] [--threads 1]
    python benchmarks/decode_speed.py --ops decode --weights int8 [--model M]

Prints GEMV and whole-FFN times (dense, sparse, speed-up, 1/(1−s)) at sparsity 0, .25, .5, .7, .9
and end-to-end greedy decode tokens/s (SmolLM2-135M on CPU, a Llama-3-8B-shaped random model on
CUDA). The same as `actsparse bench`; see `actsparse bench --help` for every flag. The `ffn` op
times `accelerate`'s own decode step, so on CPU in float32 it runs the fused C kernel of
`actsparse.speed.kernels.sparse_ffn_cpu` when a C compiler is present (ACTSPARSE_NO_CKERNEL=1 times the
PyTorch kernels instead). `--weights int8` times the decode op on int8 copies of every weight of the step
(attention, FFN, LM head; `actsparse.speed.kernels.int8`), dense and sparse alike.
"""

from __future__ import annotations

import argparse
import sys

from actsparse.cli import bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    return bench.run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
