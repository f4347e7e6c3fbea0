"""Where ``backend="auto"`` runs the CUDA C++ kernels instead of Triton: decided from measurements, never guessed.

The measurements live in ``measured_policy.json`` next to this file, one entry per (GPU model, dtype): the largest
row count up to which the CUDA C++ forward beat the Triton forward on every measured layer size, written by
``python -m bench.decode --policy lora_kernels/measured_policy.json`` on that GPU (and committed with the run's
results). A GPU model, dtype or shape without an entry keeps Triton. The entries apply to inference calls only (no
grad needed, no dropout): that is what bench.decode times; the CUDA backward has no measurement yet.

Entry fields: device (torch.cuda.get_device_name), dtype, max_rows, max_rank, min_K, min_N (the smallest measured
layer: smaller layers keep Triton), speedup (Triton time / CUDA time per measured row count, worst layer), measured
(date), source (the results folder).
"""

from __future__ import annotations

import functools
import json
import os

import torch

MEASURED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "measured_policy.json")
MARGIN = 0.97  # CUDA must be at least 3% faster than Triton on every measured layer size to be chosen


@functools.lru_cache(maxsize=None)
def entries(path: str = MEASURED_FILE) -> tuple:
    """The measured entries (an empty tuple if the file is missing or has none)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return ()
    return tuple(data.get("entries", ()))


@functools.lru_cache(maxsize=64)
def _device_name_at(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _device_name(device: torch.device) -> str:
    return _device_name_at(device.index if device.index is not None else torch.cuda.current_device())


def _dtype_name(dtype: torch.dtype) -> str:
    """The entries' spelling of a dtype: "bfloat16", not "torch.bfloat16"."""
    return str(dtype).replace("torch.", "")


def _entry_for(device_name: str, dtype: torch.dtype):
    return next((e for e in entries() if e["device"] == device_name and e["dtype"] == _dtype_name(dtype)), None)


def prefers_cuda(device_name: str, dtype: torch.dtype, M, K: int, N: int, r: int) -> bool:
    """Whether the measurements favour the CUDA C++ forward for an inference call of this shape on this GPU."""
    if not isinstance(M, int):  # a symbolic row count (torch.compile with dynamic shapes): no measured answer
        return False
    e = _entry_for(device_name, dtype)
    return (e is not None and 1 <= M <= e["max_rows"] and r <= e["max_rank"] and K >= e["min_K"]
            and N >= e["min_N"])


def choose(device: torch.device, dtype: torch.dtype, M, K: int, N: int, r: int) -> str | None:
    """'cuda' when the measurements say so for this GPU and shape, else None (keep the default)."""
    if device.type != "cuda" or not entries():
        return None
    return "cuda" if prefers_cuda(_device_name(device), dtype, M, K, N, r) else None


def derive(rows, device_name: str, dtype: str, measured: str, source: str, margin: float = MARGIN):
    """The entry that bench.decode's rows support, or None. rows: dicts with M, K, N, r, triton_us, cuda_us.
    max_rows is the largest measured M such that CUDA won by `margin` at that M and every smaller measured M, on
    every measured layer size."""
    timed = [r for r in rows if r.get("triton_us") and r.get("cuda_us")]
    if not timed:
        return None
    speedup, max_rows = {}, 0
    for M in sorted({r["M"] for r in timed}):
        at_m = [r for r in timed if r["M"] == M]
        if any(r["cuda_us"] > margin * r["triton_us"] for r in at_m):
            break
        speedup[str(M)] = round(min(r["triton_us"] / r["cuda_us"] for r in at_m), 3)
        max_rows = M
    if max_rows == 0:
        return None
    return {"device": device_name, "dtype": dtype, "max_rows": max_rows, "max_rank": max(r["r"] for r in timed),
            "min_K": min(r["K"] for r in timed), "min_N": min(r["N"] for r in timed), "speedup": speedup,
            "measured": measured, "source": source}


def write(entry, path: str = MEASURED_FILE, device_name: str | None = None, dtype: str | None = None) -> None:
    """Replace the entry of (device, dtype) in `path` by `entry` (None: remove it, for a GPU where CUDA lost)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        data = {"entries": []}
    device_name = entry["device"] if entry else device_name
    dtype = entry["dtype"] if entry else dtype
    kept = [e for e in data.get("entries", []) if (e["device"], e["dtype"]) != (device_name, dtype)]
    data["entries"] = kept + ([entry] if entry else [])
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    entries.cache_clear()


def describe(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """One line for `python -m lora_kernels.info`."""
    if device.type != "cuda":
        return "no measured choice (CPU)"
    name = _device_name(device)
    e = _entry_for(name, dtype)
    if e is None:
        return f"no measurement for {name} ({_dtype_name(dtype)}): auto keeps triton"
    return (f"cuda for inference up to {e['max_rows']} rows, r <= {e['max_rank']}, K >= {e['min_K']}, "
            f"N >= {e['min_N']} (measured {e['measured']}, {e['source']}; Triton/CUDA time {e['speedup']})")
