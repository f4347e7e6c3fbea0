"""Every run-time knob of lora-kernels, read here and nowhere else (``python -m lora_kernels.info`` shows them).

    LORA_KERNELS_BACKEND    force a backend family (torch, aten, triton, cuda) or a plan spec for backend="auto"
    LORA_KERNELS_TUNE       on (default: measure new keys on CUDA) | cached (use the cache, never measure) | off
    LORA_KERNELS_CACHE_DIR  where the plan cache lives (default: $XDG_CACHE_HOME/lora_kernels, ~/.cache/...)
    LORA_KERNELS_CUDA_EXT   unset: the CUDA C++ extension prebuilt or built just in time | prebuilt | 0 (ignored)

The first three are read once per process (``plan.reset()`` reads them again); LORA_KERNELS_CUDA_EXT when the
extension is looked for. Build-time variables (LORA_KERNELS_BUILD_CUDA, LORA_KERNELS_CUDA_ARCHS) belong to setup.py
and ``cuda_build``.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

__all__ = ["Settings", "TUNE_MODES", "settings", "reload", "apply_autotune_setting", "cuda_ext_mode"]


class Settings(NamedTuple):
    forced: str | None
    tune: str
    cache_dir: str


TUNE_MODES = ("on", "cached", "off")
_settings: Settings | None = None


def settings() -> Settings:
    global _settings
    if _settings is None:
        forced = os.environ.get("LORA_KERNELS_BACKEND") or None
        if forced is not None:
            if forced == "auto":
                forced = None
            else:
                from .plan.calls import check_name

                try:
                    check_name(forced)
                except ValueError as e:
                    raise ValueError(f"LORA_KERNELS_BACKEND: {e}") from None
        tune = os.environ.get("LORA_KERNELS_TUNE", "on") or "on"
        if tune not in TUNE_MODES:
            raise ValueError(f"LORA_KERNELS_TUNE: expected one of {', '.join(TUNE_MODES)}, got {tune!r}")
        cache_dir = os.environ.get("LORA_KERNELS_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lora_kernels")
        _settings = Settings(forced, tune, cache_dir)
        apply_autotune_setting()
    return _settings


def apply_autotune_setting() -> None:
    """LORA_KERNELS_TUNE=off also launches the first config of each Triton kernel table untimed (the tables list
    the usual winners first): nothing measured, so bits repeat from run to run."""
    configs = sys.modules.get("lora_kernels.kernels.configs")
    if configs is None:
        return
    try:
        tune = settings().tune
    except ValueError:  # a bad knob is reported where the plan is chosen
        return
    configs.AUTOTUNE = tune != "off"


def reload() -> Settings:
    """Read the environment again."""
    global _settings
    _settings = None
    return settings()


def cuda_ext_mode() -> str:
    """LORA_KERNELS_CUDA_EXT, read now: "auto" (unset), "prebuilt" or "0"."""
    mode = os.environ.get("LORA_KERNELS_CUDA_EXT", "") or "auto"
    if mode not in ("auto", "0", "prebuilt"):
        raise ValueError(f"LORA_KERNELS_CUDA_EXT: expected 0 (ignore the extension), prebuilt (no just-in-time build) "
                         f"or unset, got {mode!r}")
    return mode
