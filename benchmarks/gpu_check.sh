#!/usr/bin/env bash
# Every GPU check of the project in one call, for a session lent a CUDA machine (see the README): the
# Triton kernels', accelerate's and the packed scorer's correctness on CUDA, then the sparse GEMV / FFN speed
# tables (default masked-load kernel and the two-stage gather kernel, with the best dense baseline, the
# measured sparsity and the pre-gathered "limit" row), the top-p overhead, the Triton GEMV launch settings,
# end-to-end decode of a Llama-3-8B-shaped random model (threshold and top_k) and the peak memory inside
# accelerate. Each step has its own time limit (450 s in all, under 8 minutes with start-up), so that one
# slow step cannot eat the others. Results go to $OUT (default /tmp/gpu-out). Uses the machine's own
# torch/triton/transformers, and the package from this checkout's src/ (no install).
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
  step "correctness: Triton top-p, sparse GEMV (masked and gather), accelerate on CUDA"
  timeout 110 "$py" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_fast_topp.py tests/test_sparse_ffn.py \
    tests/test_accelerate.py tests/test_scorer.py -k "cuda or triton or gather" -rs 2>&1 | tail -30
  step "sparse GEMV (batch 1) and FFN, dense vs sparse vs limit (CUDA graphs)"
  timeout 90 "$py" benchmarks/decode_speed.py --device cuda --ops gemv,ffn --sparsities 0,0.25,0.5,0.7,0.9 \
    --repeats 15 --json "$out/decode.json"
  step "top-p overhead"
  timeout 60 "$py" benchmarks/topp_overhead.py --devices cuda --shapes 4096x14336 --tokens 1,2048 --rounds 10 \
    --json "$out/topp.json"
  step "Triton GEMV launch settings, batch 1 and 4"
  timeout 35 "$py" benchmarks/gemv_configs.py --repeats 5 --json "$out/configs.json"
  timeout 25 "$py" benchmarks/gemv_configs.py --repeats 5 --batch 4 --sparsities 0.5 --json "$out/configs_b4.json"
  step "end-to-end decode, Llama-3-8B-shaped random model (eager)"
  timeout 100 "$py" benchmarks/decode_speed.py --device cuda --ops decode --sparsities 0.5 --repeats 2 \
    --decode-tokens 16 --rules threshold,top_k --json "$out/e2e.json"
  step "peak GPU memory inside accelerate vs outside (8 layers of the 8B shape)"
  timeout 30 "$py" benchmarks/accelerate_memory.py --device cuda --random-8b --layers 8 --tokens 8 \
    --json "$out/memory.json"
  step "done"
} 2>&1 | tee "$out/log.txt"
