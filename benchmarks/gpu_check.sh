#!/usr/bin/env bash
# Every GPU check of the project in one call, for a session lent a CUDA machine (see the README): the
# Triton kernels', accelerate's and the packed scorer's correctness on CUDA, then the top-p overhead, the
# sparse GEMV / FFN speed tables, the Triton GEMV launch settings, and end-to-end decode. Each step has
# its own time limit, so that one slow step cannot eat the others; 2.5 to 3 minutes in all on an H200.
# Results go to $OUT (default /tmp/gpu-out). Uses the machine's own torch/triton/transformers, and the
# package from this checkout's src/ (no install).
set -u
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
py=$(command -v python3 || command -v python)
step() { echo "=== $1 ($(date +%T))"; }
{
  step "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$py" -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
  step "correctness: Triton top-p, sparse GEMV, accelerate on CUDA"
  timeout 150 "$py" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_fast_topp.py tests/test_sparse_ffn.py \
    tests/test_accelerate.py tests/test_scorer.py -k "cuda or triton" -rs 2>&1 | tail -30
  step "sparse GEMV and FFN, dense vs sparse (CUDA graphs)"
  timeout 100 "$py" benchmarks/decode_speed.py --device cuda --ops gemv,ffn --repeats 20 --json "$out/decode.json"
  step "top-p overhead"
  timeout 90 "$py" benchmarks/topp_overhead.py --devices cuda --shapes 576x1536,4096x14336 --tokens 1,2048 \
    --json "$out/topp.json"
  step "Triton GEMV launch settings"
  timeout 90 "$py" benchmarks/gemv_configs.py --repeats 8 --json "$out/configs.json"
  step "end-to-end decode, Llama-3-8B-shaped random model"
  timeout 80 "$py" benchmarks/decode_speed.py --device cuda --ops decode --sparsities 0,0.5,0.7 --repeats 3 \
    --decode-tokens 16 --json "$out/e2e.json"
  step "done"
} 2>&1 | tee "$out/log.txt"
