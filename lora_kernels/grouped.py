"""Grouped products over slots sorted by expert, in plain PyTorch: ``torch._grouped_mm`` where it takes the tensors,
one matmul per expert otherwise (the ATen composition of the experts op, and the gather's adjoint every variant
uses).

Slots are rows sorted by expert; ``offsets`` [E] (int32) holds each expert's end, the inclusive cumsum of its slot
counts (what transformers computes for its grouped_mm path)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["grouped_mm", "grouped_mm_t", "expert_of_slots", "scatter_rows", "Bounds", "GROUPED_MM_DTYPES"]

GROUPED_MM_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _aligned(t: Tensor) -> bool:
    """torch._grouped_mm's layout rule: one unit stride among the last two dims, the other a multiple of 16 bytes,
    the storage 16-byte aligned."""
    if t.dim() < 2 or t.data_ptr() % 16:
        return False
    a, b = t.stride(-2), t.stride(-1)
    step = 16 // t.element_size()
    return (b == 1 and a % step == 0) or (a == 1 and b % step == 0)


def _grouped_mm_takes(*tensors: Tensor) -> bool:
    first = tensors[0]
    if not hasattr(torch, "_grouped_mm") or first.dtype not in GROUPED_MM_DTYPES:
        return False
    if any(t.dtype != first.dtype or t.numel() == 0 or not _aligned(t) for t in tensors):
        return False
    if first.device.type == "cuda":
        return torch.cuda.get_device_capability(first.device) >= (8, 0)
    return first.device.type == "cpu" and not torch.compiler.is_compiling()


class Bounds:
    """Each expert's first slot and end as host integers, read from `offsets` at most once (a device sync) however
    many per-expert loops of one call need them."""

    def __init__(self, offsets: Tensor):
        self.offsets, self._list = offsets, None

    def get(self) -> list[int]:
        if self._list is None:
            self._list = [0] + [int(v) for v in self.offsets.tolist()]
        return self._list


def _bounds_of(offsets: Tensor, bounds: Bounds | None) -> list[int]:
    return (bounds or Bounds(offsets)).get()


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor, bounds: Bounds | None = None) -> Tensor:
    """out [S, N]: slot s of expert e gets a[s] @ b[e], for a [S, K] and b [E, K, N] (any strides). `bounds`: the
    call's host copy of the offsets, shared between its products (read only where a per-expert loop runs)."""
    if _grouped_mm_takes(a, b):
        return torch._grouped_mm(a, b, offs=offsets.to(torch.int32))
    out = a.new_empty((a.shape[0], b.shape[2]))
    bounds = _bounds_of(offsets, bounds)
    for e in range(len(bounds) - 1):
        torch.mm(a[bounds[e]:bounds[e + 1]], b[e], out=out[bounds[e]:bounds[e + 1]])
    return out


def grouped_mm_t(a: Tensor, b: Tensor, offsets: Tensor, bounds: Bounds | None = None) -> Tensor:
    """out [E, M, N]: expert e gets a_e^T @ b_e over its slots, for a [S, M] and b [S, N] (zeros for an expert
    without slots)."""
    at = a.t()
    if _grouped_mm_takes(at, b):
        return torch._grouped_mm(at, b, offs=offsets.to(torch.int32))
    E = offsets.shape[0]
    out = a.new_zeros((E, a.shape[1], b.shape[1]))
    bounds = _bounds_of(offsets, bounds)
    for e in range(E):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(at[:, lo:hi], b[lo:hi], out=out[e])
    return out


def expert_of_slots(offsets: Tensor, S: int) -> Tensor:
    """The expert of each of the S slots (int64), on the device without a host read."""
    ends = offsets.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    return torch.repeat_interleave(torch.arange(offsets.shape[0], device=offsets.device), counts, output_size=S)


def scatter_rows(rows: Tensor, gather: Tensor | None, T: int) -> Tensor:
    """The gather's adjoint: each of the T tokens gets the sum of its slots' rows (accumulated in fp32 for 16-bit
    rows; index_put's deterministic form under torch's deterministic mode). Without a gather, rows as they are."""
    if gather is None:
        return rows
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    out = torch.zeros((T, rows.shape[1]), device=rows.device, dtype=acc)
    out.index_put_((gather.long(),), rows.to(acc), accumulate=True)
    return out.to(rows.dtype)
