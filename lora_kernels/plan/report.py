"""What ``python -m lora_kernels.info`` shows of the planner: the cache file and the plans for typical shapes."""

from __future__ import annotations

import os

import torch

from ..settings import settings
from .cache import cache_for, cache_path, entry_key
from .calls import Call
from .lookup import choose

__all__ = ["describe", "TYPICAL"]


TYPICAL = ((1, 4096, 4096, 16), (16, 4096, 4096, 16), (1024, 4096, 4096, 16), (8192, 4096, 4096, 16),
           (8192, 4096, 14336, 16))


def describe(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """For `python -m lora_kernels.info`: the settings, the cache file and its entries, and the plan `auto` would run
    for typical shapes (training with dropout 0.05 and inference)."""
    s = settings()
    path = cache_path(device)
    entries = cache_for(device).entries
    out = {"cache": f"{path} ({len(entries)} entries)" if os.path.exists(path) else f"{path} (not written yet)"}
    plans = {}
    for M, K, N, r in TYPICAL:
        for grads, p in ((2, True), (0, False)):
            call = Call(device, dtype, M, K, N, r, p, grads, False)
            try:
                plan = choose(call, "auto", measure=False)
                cached = entry_key(s.forced or "auto", call) in cache_for(device).entries
                plans[f"M={M} K={K} N={N} r={r} {'train p>0' if grads else 'inference'}"] = (
                    f"{plan.spec if grads else plan.forward} ({'measured' if cached else 'static default'})")
            except Exception as e:  # a forced backend that cannot run here: say so
                plans[f"M={M} K={K} N={N} r={r}"] = f"error: {e}"
                break
    out["plans (bf16)"] = plans
    return out
