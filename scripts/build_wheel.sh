#!/usr/bin/env bash
# Builds the lora-kernels wheel with the CUDA C++ extension for one CUDA version, then installs it in a fresh
# virtual environment and checks it there (scripts/check_wheel.py). A compile error fails the script.
#
#   scripts/build_wheel.sh [OUT_DIR]          (default dist/)
#
# Environment:
#   TORCH_SPEC                 the CUDA build of torch to build against (default "torch==2.14.1", CUDA 13.0)
#   TORCH_INDEX_URL            extra index for it (e.g. https://download.pytorch.org/whl/cu128 for CUDA 12.8)
#   CUDA_TOOLKIT_SPEC          pip toolkit used when no nvcc is found (default "cuda-toolkit[nvcc,cccl]==13.0.*")
#   LORA_KERNELS_CUDA_ARCHS    SASS targets (default "80;86;89;90a", PTX for the newest)
#   PYTHON                     interpreter for the venvs (default python3)
#   PIP_TOOLKIT=1              use the pip toolkit even when a system nvcc exists
#   SKIP_CHECK=1               build only
# The wheel is tagged cp310-abi3 (stable ABI: any Python >= 3.10, any torch >= 2.10) and versioned +cuXY.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/dist}" && cd "${1:-$ROOT/dist}" && pwd)"
PY="${PYTHON:-python3}"
# the build's targets, also read by the check (every one must be in the library)
export LORA_KERNELS_CUDA_ARCHS="${LORA_KERNELS_CUDA_ARCHS:-80;86;89;90a}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
pip_torch() {  # pip_torch VENV: install the torch build into VENV
  "$1/bin/python" -m pip install -q ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC"
}

echo "== build venv ($TORCH_SPEC)"
"$PY" -m venv "$WORK/build"
"$WORK/build/bin/python" -m pip install -q --upgrade pip
pip_torch "$WORK/build"
"$WORK/build/bin/python" -m pip install -q "setuptools>=77" wheel ninja numpy

if [ "${PIP_TOOLKIT:-0}" = 1 ] || ! CUDA_HOME="$("$WORK/build/bin/python" -c "
import importlib.util, sys
spec = importlib.util.spec_from_file_location('cb', '$ROOT/lora_kernels/cuda_build.py')
cb = importlib.util.module_from_spec(spec); spec.loader.exec_module(cb)
home = cb.find_cuda_home(); print(home or ''); sys.exit(0 if home else 1)")"; then
  echo "== no CUDA toolkit found: installing ${CUDA_TOOLKIT_SPEC:=cuda-toolkit[nvcc,cccl]==13.0.*} from PyPI"
  "$WORK/build/bin/python" -m pip install -q "$CUDA_TOOLKIT_SPEC"
  CUDA_HOME="$(dirname "$(dirname "$(ls "$WORK"/build/lib/python3*/site-packages/nvidia/cu[0-9]*/bin/nvcc | head -1)")")"
  # the pip toolkit ships libcudart.so.N only; the linker wants libcudart.so
  (cd "$CUDA_HOME/lib" && [ -e libcudart.so ] || ln -s libcudart.so.* libcudart.so) || true
fi
export CUDA_HOME
echo "== CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -1))"

echo "== wheel"
rm -rf "$ROOT/build"
start=$(date +%s)
(cd "$ROOT" && LORA_KERNELS_BUILD_CUDA=1 "$WORK/build/bin/python" -m pip wheel -q --no-build-isolation --no-deps \
    -w "$OUT" .)
WHEEL="$(ls -t "$OUT"/lora_kernels-*abi3*.whl | head -1)"
echo "built $(basename "$WHEEL") in $(( $(date +%s) - start )) s"
[ "${SKIP_CHECK:-0}" = 1 ] && exit 0

echo "== fresh venv: install and check"
"$PY" -m venv "$WORK/check"
"$WORK/check/bin/python" -m pip install -q --upgrade pip
pip_torch "$WORK/check"
"$WORK/check/bin/python" -m pip install -q "$WHEEL"
(cd "$WORK" && "$WORK/check/bin/python" "$ROOT/scripts/check_wheel.py" "$WHEEL")
