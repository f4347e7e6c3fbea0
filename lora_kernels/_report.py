"""Versions, devices and which backends can run here (and why not): ``python -m lora_kernels.info``."""

from __future__ import annotations

import platform

import torch

from . import backends, plan


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as e:  # missing or broken
        return f"not available ({type(e).__name__})"


def _planner() -> dict:
    """How the planner chooses (lora_kernels/plan/): its knobs and the Triton autotuner's state."""
    try:
        settings = plan.settings()
    except ValueError as e:  # a wrong knob: say so here rather than fail the report
        return {"planner": f"error: {e}"}
    out = {
        "planner (LORA_KERNELS_TUNE)": {"on": "measure each new call shape on CUDA, keep the fastest (cached)",
                                         "cached": "use measured plans from the cache, never measure",
                                         "off": "static defaults only, Triton's first config per kernel"}[settings.tune],
        "forced backend (LORA_KERNELS_BACKEND)": settings.forced or "none (auto)",
        "plan cache (LORA_KERNELS_CACHE_DIR)": settings.cache_dir,
    }
    if backends.triton_import_error() is None:
        from .kernels import configs

        out["triton autotuning"] = (("on, timings kept in Triton's disk cache" if configs.AUTOTUNE_KWARGS else "on")
                                    if configs.AUTOTUNE else "off: first config of each table")
    return out


def _cuda_extension() -> str:
    from . import cuda_ext

    return cuda_ext.describe() + "; backend='auto' measures it against the other variants where it is built"


def _bitsandbytes() -> str:
    from .quantized import bitsandbytes_info

    return bitsandbytes_info()


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
        **_planner(),
        "CUDA C++ extension": _cuda_extension(),
        "bitsandbytes (QLoRA base layers)": _bitsandbytes(),
        "devices": {},
    }
    for dev in devices:
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
        st = backends.status(dev)
        try:
            plans = plan.describe(dev)
        except Exception as e:  # a bad knob or a forced backend that cannot run here
            plans = {"error": f"{type(e).__name__}: {e}"}
        report["devices"][str(dev)] = {
            "name": name,
            "planner": plans,
            "backends": {k: ("available" if v is None else f"unavailable: {v}") for k, v in st.items()},
        }
    if as_dict:
        return report
    for key, value in report.items():
        if key != "devices":
            print(f"{key:42s} {value}")
    for dev, d in report["devices"].items():
        print(f"\n[{dev}] {d['name']}")
        for k, v in d["backends"].items():
            print(f"  {k:8s} {v}")
        for k, v in d["planner"].items():
            if isinstance(v, dict):
                print(f"  {k}:")
                for shape, chosen in v.items():
                    print(f"    {shape:40s} {chosen}")
            else:
                print(f"  {k}: {v}")
    return None

