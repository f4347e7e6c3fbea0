#!/usr/bin/env bash
# One command for a machine with a GPU: install, run the whole test suite natively on the GPU, run the demo,
# and leave the logs with the card, date and versions in one folder ready to commit.
#   bash scripts/gpu_run.sh [OUT_DIR]        (default: bench/results/gpu-<date>)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$out"
python3 -m pip install -q -e ".[test,bench]" 2>&1 | tail -3
export PYTHONUNBUFFERED=1
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -m lora_kernels.info
} > "$out/env.txt" 2>&1
cat "$out/env.txt"
python -m pytest -q tests 2>&1 | tee "$out/tests.log" | tail -25
python -m bench.demo 2>&1 | tee "$out/demo.txt"
echo "results in $out"
