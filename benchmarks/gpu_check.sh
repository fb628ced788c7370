#!/usr/bin/env bash
# Every GPU check of the project in one call, for a session lent a CUDA machine (see the README):
# the Triton kernels' correctness on CUDA, then the top-p overhead and sparse-decode speed tables.
# Results go to $OUT (default /tmp/gpu-out). Uses the machine's own torch/triton/transformers.
set -u
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
python -m pip install --quiet --no-deps --no-build-isolation -e . >"$out/install.txt" 2>&1 || python -m pip install --quiet --no-deps -e . >>"$out/install.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv >"$out/gpu.txt" 2>&1
python -m pytest -q -p no:cacheprovider tests/test_fast_topp.py tests/test_sparse_ffn.py 2>&1 | tail -25 | tee "$out/tests.txt"
timeout 240 python benchmarks/topp_overhead.py --devices cuda --json "$out/topp.json" 2>&1 | tee "$out/topp.txt"
timeout 300 python benchmarks/decode_speed.py --device cuda --json "$out/decode.json" 2>&1 | tee "$out/decode.txt"
