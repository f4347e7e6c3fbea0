"""Versions, devices and which backends can run here (and why not): ``python -m lora_kernels.info``."""

from __future__ import annotations

import platform

import torch

from . import backends, policy


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:  # missing or broken
        return f"not available ({type(e).__name__})"


def _triton_settings() -> dict:
    """How the Triton backend picks its kernels (see docs/design.md), with the environment knobs."""
    if backends._triton_import_error() is not None:
        return {}
    from .kernels import backward, configs, forward

    try:
        bwd = f"{backward.backward_variant()} for 16-bit, {backward.backward_variant(torch.float32)} for fp32"
    except ValueError as e:  # a wrong knob: say so here rather than fail the report
        bwd = f"error: {e}"
    try:
        mixed = {"gated": "gated (every stacked rank, rows as they come)",
                 "sorted": "sorted (rows in adapter order; gated with dropout)"}[forward.mixed_variant(False)]
    except ValueError as e:
        mixed = f"error: {e}"
    return {
        "triton forward": f"one launch below {forward.CUBLAS_MIN_M} rows (16-bit, no dropout, r <= 64), else "
                          "thin kernel + GEMM; cuBLAS GEMM from that size and for fp32",
        "triton backward (LORA_KERNELS_BACKWARD)": bwd,
        "triton mixed batches (LORA_KERNELS_MIXED)": mixed,
        "triton autotuning (LORA_KERNELS_AUTOTUNE)": (
            ("on, timings kept in Triton's disk cache" if configs.AUTOTUNE_KWARGS.get("cache_results") else "on")
            if configs.AUTOTUNE else "off: first config of each table"),
    }


def _cuda_extension() -> str:
    from . import cuda_ext

    return cuda_ext.describe() + "; backend='auto' picks it only where measured faster (see 'measured choice' below)"


def info(as_dict: bool = False):
    """Report versions, devices and backend availability; prints it, or returns a dict when as_dict."""
    from . import __version__

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    report = {
        "lora_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "triton": _version("triton"),
        "triton interpreter (TRITON_INTERPRET=1)": backends.triton_interpreting(),
        **_triton_settings(),
        "CUDA C++ extension": _cuda_extension(),
        "devices": {},
    }
    for dev in devices:
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
        st = backends.status(dev)
        auto = backends.resolve("auto", dev, torch.bfloat16) if dev.type == "cuda" else "torch"
        report["devices"][str(dev)] = {
            "name": name,
            "auto backend (bf16)": auto,
            "auto, measured choice (bf16 inference)": policy.describe(dev),
            "backends": {k: ("available" if v is None else f"unavailable: {v}") for k, v in st.items()},
        }
    if as_dict:
        return report
    for key, value in report.items():
        if key != "devices":
            print(f"{key:42s} {value}")
    for dev, d in report["devices"].items():
        print(f"\n[{dev}] {d['name']}  (auto -> {d['auto backend (bf16)']})")
        print(f"  measured choice: {d['auto, measured choice (bf16 inference)']}")
        for k, v in d["backends"].items():
            print(f"  {k:8s} {v}")
    return None

