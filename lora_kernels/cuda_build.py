"""How the CUDA C++ extension (csrc/) is compiled: shared by setup.py (wheels, ``pip install``) and the just-in-time
build of a source checkout (``lora_kernels.cuda_ext``). No torch import at module level: setup.py reads it first.

Environment:
    LORA_KERNELS_CUDA_ARCHS   ';'-separated SASS targets (default "80;86;89;90a"); PTX is added for the newest
                              one, so newer GPUs JIT-compile it. Targets the nvcc cannot build are skipped.
    LORA_KERNELS_BUILD_CUDA   "0" skips the extension (pure Python install), "1" makes a failure to build it an error.
    MAX_JOBS                  parallel compile jobs (default: bounded by cores and by memory, ~1.5 GiB per nvcc).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sysconfig

EXT_NAME = "lora_kernels._C"
DEFAULT_ARCHS = "80;86;89;90a"
# Stable-ABI target: the extension runs on any torch from this version on (see csrc/lora_kernels_cuda.cpp).
TORCH_TARGET_VERSION = "0x020a000000000000"  # 2.10


def sources(root: str) -> list[str]:
    """The .cpp/.cu files, relative to `root` (setuptools wants relative paths)."""
    files = ["csrc/lora_kernels_cuda.cpp", "csrc/dispatch.cu"] + sorted(
        os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "csrc", "instantiations", "*.cu")))
    return files


def find_cuda_home() -> str | None:
    """The CUDA toolkit root. An explicit CUDA_HOME/CUDA_PATH wins; `nvcc` on PATH may be a wrapper script (then its
    parent is not the toolkit), so a candidate counts only if it holds bin/nvcc and include/cuda_runtime.h."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script names the real binary
            text = open(nvcc, "rb").read(4096).decode("utf-8", "ignore")
            candidates += [os.path.dirname(os.path.dirname(m)) for m in re.findall(r"(/\S+/bin/nvcc)\b", text)]
        except OSError:
            pass
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    # pip's cuda-toolkit[nvcc] wheels
    candidates += glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu[0-9]*"))
    for c in candidates:
        if os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def nvcc_archs(cuda_home: str) -> set[str]:
    """The compute_XX targets this nvcc can build (e.g. {'80', '90', '90a'}). nvcc --list-gpu-arch names the base
    architectures only; each from sm_90 on also has its arch-specific target (90a, 100a, ...), which nvcc builds
    whenever it builds the base one."""
    out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"], capture_output=True,
                         text=True, check=True).stdout
    base = set(re.findall(r"compute_(\d+)\b", out))
    return base | {f"{a}a" for a in base if int(a) >= 90}


def gencode_flags(cuda_home: str) -> tuple[list[str], list[str]]:
    """(-gencode flags, skipped targets) for LORA_KERNELS_CUDA_ARCHS."""
    wanted = [a.strip().replace("sm_", "") for a in os.environ.get("LORA_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS).split(";")
              if a.strip()]
    supported = nvcc_archs(cuda_home)
    flags, skipped = [], []
    for a in wanted:
        if a in supported:
            flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        else:
            skipped.append(a)
    built = [a for a in wanted if a in supported]
    if not built:
        raise RuntimeError(f"nvcc at {cuda_home} supports none of LORA_KERNELS_CUDA_ARCHS={wanted}")
    newest = max(built, key=lambda a: int(re.sub(r"\D", "", a)))
    ptx = re.sub(r"[a-z]$", "", newest)  # arch-specific targets (90a) have no forward-compatible PTX
    if ptx in supported:
        flags += ["-gencode", f"arch=compute_{ptx},code=compute_{ptx}"]
    return flags, skipped


def cxx_flags() -> list[str]:
    return ["-O3", "-std=c++17", f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}"]


def nvcc_flags(cuda_home: str) -> list[str]:
    return ["-O3", "-std=c++17", "--expt-relaxed-constexpr", *gencode_flags(cuda_home)[0]]


def default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    return max(1, min(cores, int(mem_gib / 1.5)))
