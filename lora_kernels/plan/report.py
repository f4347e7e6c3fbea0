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
# MoE experts: Qwen3-30B-A3B's gate_up projection, 4096 tokens routed to 8 of 128 experts (slots, K, N, r, experts)
TYPICAL_EXPERTS = ((32768, 2048, 1536, 16, 128),)


def describe(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """For `python -m lora_kernels.info`: the settings, the cache file and its entries, and the plan `auto` would run
    for typical shapes (training with dropout 0.05 and inference)."""
    s = settings()
    path = cache_path(device)
    entries = cache_for(device).entries
    out = {"cache": f"{path} ({len(entries)} entries)" if os.path.exists(path) else f"{path} (not written yet)"}
    plans = {}
    shapes = [(M, K, N, r, 0) for M, K, N, r in TYPICAL] + list(TYPICAL_EXPERTS)
    for M, K, N, r, experts in shapes:
        label = f"M={M} K={K} N={N} r={r}" + (f" experts={experts}" if experts else "")
        for grads, p in ((2, True), (0, False)):
            call = Call(device, dtype, M, K, N, r, p, grads, False, experts=experts)
            try:
                plan = choose(call, "auto", measure=False)
                cached = entry_key(s.forced or "auto", call) in cache_for(device).entries
                plans[f"{label} {'train p>0' if grads else 'inference'}"] = (
                    f"{plan.spec if grads else plan.forward} ({'measured' if cached else 'static default'})")
            except Exception as e:  # a forced backend that cannot run here: say so
                plans[label] = f"error: {e}"
                break
    out["plans (bf16)"] = plans
    return out
