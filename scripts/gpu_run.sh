#!/usr/bin/env bash
# One command for a machine with a GPU (target: under 9 minutes): run the test suite natively on the GPU, the
# demo and the benchmarks, and leave logs, CSV, summary and plots in one folder ready to commit.
#   bash scripts/gpu_run.sh [OUT_DIR]        (default: bench/results/gpu-<date>)
# Works offline: uses the torch / triton / peft / transformers already installed (installs nothing new).
# The GPU-compile test is left to CI (it needs no GPU); the CUDA extension is built here once csrc/ exists.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -m pip list 2>/dev/null | grep -iE "^(torch|triton|peft|transformers|numpy) "
  $py -m lora_kernels.info
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
timeout 300 $py -m pytest -q tests --deselect tests/test_kernels_compile.py -p no:cacheprovider 2>&1 \
  | tee "$out/tests.log" | tail -20
$py -m bench.demo 2>&1 | tee "$out/demo.txt"
timeout 300 $py -m bench --out "$out" 2>&1 | tee "$out/bench.log" | tail -60
echo "results in $out"
