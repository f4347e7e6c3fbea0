#!/usr/bin/env bash
# One command for a machine with a GPU (about 9 minutes): the test suite natively on the GPU (Triton and CUDA C++
# backends, DoRA, QLoRA, MoE experts), the planner's tuning, the decode benchmark, the layer benchmarks (auto vs eager,
# DoRA, QLoRA), the MoE experts block, a training step and the demo, with logs, CSV, summary and plots in one folder.
#   bash scripts/gpu_run.sh [OUT_DIR]        (default: bench/results/gpu-<date>)
# Works offline: uses the torch / triton / peft / transformers already installed (installs nothing new).
# The GPU-compile test is left to CI (it needs no GPU). Each step has its own time limit, so a slow step
# cannot take the others' results with it; failures are written to fail.log as they happen.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
# The CUDA C++ extension: a library built elsewhere (stable ABI: any torch >= 2.10 of the same CUDA major) is used
# as it is; otherwise it is built here when a toolkit is found (about a minute).
if ! ls lora_kernels/_C*.so >/dev/null 2>&1; then
  # only this card's architecture (sm_90a on an H100/H200): the build is part of the timed run
  archs=${LORA_KERNELS_CUDA_ARCHS:-$($py -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}' + ('a' if a >= 9 else ''))" 2>/dev/null)}
  LORA_KERNELS_CUDA_ARCHS="${archs:-80;90a}" LORA_KERNELS_BUILD_CUDA=1 $py setup.py -q build_ext --inplace > "$out/build_ext.log" 2>&1
  echo "CUDA extension build: exit $? (log: build_ext.log)"
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -m pip list 2>/dev/null | grep -iE "^(torch|triton|peft|transformers|bitsandbytes|numpy) "
  $py -m lora_kernels.info
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
# Tests: the general files with one config per kernel (LORA_KERNELS_TUNE=off: no autotuning per test shape) and
# tests/test_gpu.py with full autotuning, side by side in worker processes when pytest-xdist is there (Triton
# compiles are CPU-bound). Failures are written to fail-*.log as they happen. About 2 minutes on an H100 machine.
par() { $py -c "import xdist, pytest_timeout; print('-n $1 --timeout 170')" 2>/dev/null; }
: > "$out/fail-general.log"; : > "$out/fail-gpu.log"
( LORA_KERNELS_TUNE=off LORA_KERNELS_FAIL_LOG="$out/fail-general.log" timeout "${TESTS_S:-170}" $py -m pytest -q -rfEs \
    --durations=10 $(par 12) tests --deselect tests/test_kernels_compile.py --ignore tests/test_gpu.py \
    -p no:cacheprovider > "$out/tests-general.log" 2>&1; echo "general tests: exit $?" ) &
( LORA_KERNELS_FAIL_LOG="$out/fail-gpu.log" timeout "${TESTS_S:-170}" $py -m pytest -q -rfEs --durations=10 $(par 4) \
    tests/test_gpu.py -p no:cacheprovider > "$out/tests-gpu.log" 2>&1; echo "GPU tests: exit $?" ) &
wait
tail -n 2 "$out/tests-general.log" "$out/tests-gpu.log"
# The planner: the usual shapes measured into a fresh plan cache (every candidate's time and the tuning cost per key).
export LORA_KERNELS_CACHE_DIR="$out/plan-cache"
timeout "${TUNE_S:-45}" $py -m lora_kernels.tune --shapes 4096x4096x16,4096x14336x16 --tokens 1,16,1024,8192 \
  > "$out/tune.txt" 2>&1
echo "tune: exit $?"
timeout "${DECODE_S:-60}" $py -m bench.decode --out "$out" --M 1,16 > "$out/decode.txt" 2>&1
echo "decode bench: exit $?"; cat "$out/decode.txt"
# The torch provider is the reference formulas (its dropout mask is slow int64 math): left out of GPU timing.
timeout "${BENCH_S:-110}" $py -m bench --out "$out" --max-minutes 1.6 --no-table1 \
  --providers cublas,eager,peft,aten,triton,auto,peft_dora,dora,peft_qlora,qlora \
  --M 16,1024,8192 --KN 4096x4096,4096x14336 --r 16 > "$out/bench.log" 2>&1
echo "bench: exit $?"
# MoE experts blocks (Qwen3-30B-A3B = PEFT #3577's shape, gpt-oss-20b), 4096 tokens: PEFT 0.21 vs the split-LoRA ATen
# composition vs the fused kernels vs the frozen grouped_mm floor, forward + backward
timeout "${EXPERTS_S:-50}" $py -m bench.experts --models qwen3-30b-a3b,gpt-oss-20b --tokens 4096 --out "$out" \
  > "$out/experts.txt" 2>&1
echo "experts bench: exit $?"; tail -n 4 "$out/experts.txt"
timeout "${TRAIN_S:-55}" $py -m bench.train --layers 2 --batch 8 --seq 2048 --r 16 --dropout 0.05 --steps 6 \
  --out "$out" > "$out/train.txt" 2>&1
echo "train: exit $?"; cat "$out/train.txt"
# (python -m bench.sweep: every variant per shape with its tile configs; run it on its own when retuning defaults)
timeout 25 $py -m bench.demo > "$out/demo.txt" 2>&1
cat "$out/demo.txt"
echo "results in $out"
