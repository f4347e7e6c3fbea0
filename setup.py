"""Build script. Metadata lives in pyproject.toml (the version in lora_kernels/__init__.py); this file only decides whether the CUDA C++ extension of csrc/
is built. It is built when torch (a CUDA build) and a CUDA toolkit are importable/found at build time, i.e. with
``pip install --no-build-isolation .`` or ``scripts/build_wheel.sh``; otherwise (including pip's default isolated
build) the pure Python package is installed and the Triton and torch backends serve. lora_kernels/cuda_build.py
has the flags and the environment variables."""

import importlib.util
import os
import re
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("cuda_build", os.path.join(ROOT, "lora_kernels", "cuda_build.py"))
cuda_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cuda_build)


def cuda_extension():
    """(ext_modules, cmdclass, options), or a reason for building without the extension."""
    if os.environ.get("LORA_KERNELS_BUILD_CUDA") == "0":
        return "LORA_KERNELS_BUILD_CUDA=0"
    cuda_home = cuda_build.find_cuda_home()
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME to the toolkit root)"
    os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as e:
        return f"torch is not importable at build time ({e}); pip builds in isolation unless --no-build-isolation"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU build"
    os.environ.setdefault("MAX_JOBS", str(cuda_build.default_max_jobs()))
    flags, skipped = cuda_build.gencode_flags(cuda_home)
    if skipped:
        print(f"lora-kernels: nvcc cannot build sm_{', sm_'.join(skipped)}; skipped", file=sys.stderr)
    ext = CUDAExtension(
        cuda_build.EXT_NAME, cuda_build.sources(ROOT), py_limited_api=True,
        extra_compile_args={"cxx": cuda_build.cxx_flags(), "nvcc": cuda_build.nvcc_flags(cuda_home)})
    # The stable ABI ties the binary to the CUDA major only; a source build's _C.abi3.so serves the local CUDA, and
    # scripts/build_wheel.sh puts one library per CUDA major (_C_cu12, _C_cu13) into the released wheel.
    return ([ext], {"build_ext": BuildExtension.with_options(use_ninja=True)},
            {"bdist_wheel": {"py_limited_api": "cp310"}}, base_version())


def base_version():
    text = open(os.path.join(ROOT, "lora_kernels", "__init__.py")).read()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


result = cuda_extension()
if isinstance(result, str):
    if os.environ.get("LORA_KERNELS_BUILD_CUDA") == "1":
        sys.exit(f"lora-kernels: LORA_KERNELS_BUILD_CUDA=1 but the CUDA extension cannot be built: {result}")
    print(f"lora-kernels: building without the CUDA C++ extension ({result}); "
          "the Triton and torch backends serve", file=sys.stderr)
    setup(version=base_version())
else:
    ext_modules, cmdclass, options, version = result
    setup(ext_modules=ext_modules, cmdclass=cmdclass, options=options, version=version)
