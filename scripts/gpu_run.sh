#!/usr/bin/env bash
# One command for a machine with a GPU (target: under 9 minutes): install, run the test suite natively on the
# GPU, run the demo and the benchmarks, and leave logs, CSV, summary and plots in one folder ready to commit.
#   bash scripts/gpu_run.sh [OUT_DIR]        (default: bench/results/gpu-<date>)
# The GPU-compile test is left to CI (it needs no GPU); the CUDA extension is built here once csrc/ exists.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$out"
python3 -m pip install -q -e ".[test,peft,bench]" 2>&1 | grep -v WARNING | tail -3
export PYTHONUNBUFFERED=1
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -m lora_kernels.info
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
timeout 240 python -m pytest -q -x tests --deselect tests/test_kernels_compile.py 2>&1 | tee "$out/tests.log" | tail -15
python -m bench.demo 2>&1 | tee "$out/demo.txt"
timeout 300 python -m bench --out "$out" 2>&1 | tee "$out/bench.log" | tail -60
echo "results in $out"
