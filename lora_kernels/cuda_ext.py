"""Loading the CUDA C++ extension (csrc/): the prebuilt library of a wheel or ``pip install --no-build-isolation``,
else (in a source checkout, with a CUDA build of torch and a CUDA toolkit) a just-in-time build, cached and
locked by torch.utils.cpp_extension, so two processes building at once wait for one another.

Nothing here raises: ``load()`` returns None when the ops ``torch.ops.lora_kernels_cuda.*`` are registered, else
the reason, which ``python -m lora_kernels.info`` prints and ``backend="cuda"`` raises. A library that exists but
cannot be loaded, or a just-in-time build that fails, warns once.

Environment (an installation setting, not a dispatch knob): LORA_KERNELS_CUDA_EXT=0 ignores the extension;
LORA_KERNELS_CUDA_EXT=prebuilt uses a prebuilt library only (no just-in-time build).
"""

from __future__ import annotations

import functools
import glob
import os
import warnings

import torch

from . import cuda_build, settings

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCE_ROOT = os.path.dirname(PACKAGE_DIR)
_loaded_from: str | None = None  # set by load(): where the registered ops came from


def _registered() -> bool:
    try:
        torch.ops.lora_kernels_cuda.forward  # noqa: B018  (raises AttributeError when absent)
        return True
    except (AttributeError, RuntimeError):
        return False


def prebuilt_libraries() -> list[str]:
    """Every prebuilt library next to the package: a wheel's ``_C_cu<major>.abi3.so`` (one per CUDA major), or the
    ``_C.abi3.so`` of a source build."""
    return sorted(glob.glob(os.path.join(PACKAGE_DIR, "_C*.so")) + glob.glob(os.path.join(PACKAGE_DIR, "_C*.pyd")))


def library_major(path: str) -> str | None:
    """The CUDA major a wheel's library was built for (None: a source build's, for the local CUDA)."""
    name = os.path.basename(path)
    return name[len("_C_cu"):].split(".")[0] if name.startswith("_C_cu") else None


def prebuilt_library() -> str | None:
    """The library that serves this torch: the one built for its CUDA major, else a source build's."""
    found = prebuilt_libraries()
    major = torch.version.cuda.split(".")[0] if torch.version.cuda else None
    return next((p for p in found if library_major(p) == major), None) or \
        next((p for p in found if library_major(p) is None), None)


def has_sources() -> bool:
    return os.path.isfile(os.path.join(SOURCE_ROOT, "csrc", "lora_kernels_cuda.cpp"))


def _warn(message: str) -> None:
    warnings.warn(f"lora_kernels: {message}; the Triton and torch backends serve. "
                  "`python -m lora_kernels.info` shows the backends.", RuntimeWarning, stacklevel=4)


def _jit_build() -> None:
    """Builds csrc/ with torch.utils.cpp_extension.load into its cache (~1 min with 2 cores) and registers the ops."""
    cuda_home = cuda_build.find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("no CUDA toolkit found for the just-in-time build (set CUDA_HOME to the toolkit root)")
    os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp_extension

    # The module reads CUDA_HOME once at import; a wrapper `nvcc` on PATH makes that guess wrong.
    cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("MAX_JOBS", str(cuda_build.default_max_jobs()))
    if "LORA_KERNELS_CUDA_ARCHS" not in os.environ and torch.cuda.is_available():
        # only this machine's GPU: a third of the compile time of the wheel's four targets
        major, minor = torch.cuda.get_device_capability()
        os.environ["LORA_KERNELS_CUDA_ARCHS"] = "90a" if (major, minor) == (9, 0) else f"{major}{minor}"
    warnings.warn("lora_kernels: building the CUDA C++ extension just in time (once; cached by torch)",
                  RuntimeWarning, stacklevel=4)
    cpp_extension.load(
        name="lora_kernels_C",
        sources=[os.path.join(SOURCE_ROOT, s) for s in cuda_build.sources(SOURCE_ROOT)],
        extra_cflags=cuda_build.cxx_flags(), extra_cuda_cflags=cuda_build.nvcc_flags(cuda_home),
        is_python_module=False, verbose=False)


def _mode() -> str:
    return settings.cuda_ext_mode()


def built() -> bool:
    """Whether the extension is usable without building it now: its ops registered, or a prebuilt library that
    loads (the planner's `auto` considers the CUDA C++ kernels only then)."""
    if _registered():
        return True
    if _mode() == "0" or not torch.version.cuda:
        return False
    return _load_prebuilt() is None


@functools.lru_cache(maxsize=None)
def _load_prebuilt() -> str | None:
    """Loads the prebuilt library: None when its ops are registered, else why not (no library, or it failed)."""
    global _loaded_from
    library = prebuilt_library()
    if not library:
        others = [os.path.basename(p) for p in prebuilt_libraries()]
        if others:  # a wheel whose libraries are for other CUDA majors than torch's
            error = (f"the installed libraries ({', '.join(others)}) are built for other CUDA majors than torch's "
                     f"CUDA {torch.version.cuda}")
            _warn(error)
            return error
        return "no prebuilt library"
    try:
        torch.ops.load_library(library)
        _loaded_from = os.path.basename(library)
        return None
    except Exception as e:  # a mismatched or broken build
        error = f"{os.path.basename(library)} could not be loaded ({type(e).__name__}: {e})"
        _warn(error)
        return error


@functools.lru_cache(maxsize=None)
def load() -> str | None:
    """None once the extension's ops are registered, else why they are not."""
    global _loaded_from
    if _mode() == "0":
        return "disabled by LORA_KERNELS_CUDA_EXT=0"
    if _registered():
        _loaded_from = _loaded_from or "registered before lora_kernels looked"
        return None
    if not torch.version.cuda:
        return (f"torch {torch.__version__} is a CPU build; the CUDA C++ extension needs a CUDA build of torch "
                "(>= 2.10)")
    prebuilt_error = _load_prebuilt()
    if prebuilt_error is None:
        return None
    load_error = None if prebuilt_error == "no prebuilt library" else prebuilt_error
    if has_sources() and not torch.cuda.is_available():
        return (f"{load_error + '; ' if load_error else ''}not built; a source checkout builds it just in time on "
                "first use on a machine with a GPU (or run scripts/build_wheel.sh)")
    if has_sources() and _mode() != "prebuilt":
        try:
            _jit_build()
            _loaded_from = "just-in-time build"
            return None
        except Exception as e:
            reason = (f"{load_error + '; ' if load_error else ''}the just-in-time build of csrc/ failed "
                      f"({type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''})")
            _warn(reason)
            return reason
    if load_error:
        return load_error
    return ("the CUDA C++ extension (lora_kernels._C) is not part of this install: install a wheel built with it "
            "or build from source (docs/install.md)")


def describe() -> str:
    """One line for `python -m lora_kernels.info`: where the extension came from (for torch's CUDA major), the other
    libraries the wheel holds and why they are not loaded, or why it is unavailable."""
    reason = load()
    chosen = prebuilt_library()
    others = [f"{os.path.basename(p)} not loaded (built for CUDA {library_major(p)}, torch has CUDA "
              f"{torch.version.cuda or 'none'})" for p in prebuilt_libraries() if p != chosen and library_major(p)]
    head = f"unavailable: {reason}" if reason else f"loaded ({_loaded_from})"
    return "; ".join([head] + others)
