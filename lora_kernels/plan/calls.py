"""What a call is (``Call``), what runs it (``Plan``), and the names: the variants (from ``backends.VARIANTS``) and the
backend families that may run them."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .. import backends

__all__ = ["Call", "Plan", "bucket", "padded_rank", "parse_spec", "check_name", "FORWARDS", "BACKWARDS",
           "MIXED_FORWARDS", "MIXED_BACKWARDS", "EXPERTS_FORWARDS", "EXPERTS_BACKWARDS", "FAMILIES", "AUTO_FAMILIES",
           "NAMES"]


def _names(direction: str, *takes: str) -> tuple:
    return tuple(dict.fromkeys(v.name for v in backends.VARIANTS if v.direction == direction and v.takes in takes))


FORWARDS = _names("forward", "dense", "quantized")
BACKWARDS = _names("backward", "dense")
MIXED_FORWARDS = _names("forward", "mixed")
MIXED_BACKWARDS = _names("backward", "mixed")
EXPERTS_FORWARDS = _names("forward", "experts")
EXPERTS_BACKWARDS = _names("backward", "experts")

# The variants each backend family may run: (forwards, backwards, mixed forwards, mixed backwards, experts forwards,
# experts backwards). `aten` (every product by ATen, the package's dropout mask) belongs to the Triton family too: it
# is how that family serves fp32 (Triton's fp32 dots sum in sequence, less accurate than cuBLAS). The CUDA C++ kernels
# have no mixed-batch or experts kernels: that family runs the Triton ones there; `aten` runs the reference's
# per-adapter formulas for mixed batches and the split-LoRA grouped products for experts.
FAMILIES = {
    "torch": (("torch",), ("torch",), ("torch",), ("torch",), ("torch",), ("torch",)),
    "aten": (("aten",), ("aten",), ("torch",), ("torch",), ("aten",), ("aten",)),
    "triton": (("triton_fused", "triton_xa_first", "triton_cublas", "triton_quantized", "aten"),
               ("triton_split", "triton_fused", "aten"),
               ("triton_gated", "triton_gated_cublas", "triton_sorted"), ("triton_split",),
               ("triton_grouped", "aten"), ("triton_grouped", "aten")),
    "cuda": (("cuda_decode", "cuda_tiled"), ("cuda",), ("triton_gated", "triton_gated_cublas", "triton_sorted"),
             ("triton_split",), ("triton_grouped",), ("triton_grouped",)),
}
AUTO_FAMILIES = ("aten", "triton", "cuda")  # what `auto` measures on CUDA (torch is the reference, never faster)
NAMES = ("auto", *FAMILIES)

SIXTEEN_BIT = (torch.float16, torch.bfloat16)
CUBLAS_MIN_ROWS = 2048  # rows from which the Triton forward leaves x W0^T to cuBLAS (H100: see docs/design.md)
SPLIT_MIN_N = 8192  # out_features from which the split Triton backward beat eager's on the H100
DECODE_MAX_ROWS = 16  # the CUDA C++ one-pass decode kernel (csrc/lora_launch.h kDecodeMaxM)
CUDA_MAX_RANK = 256
FUSED_MAX_RANK = 64  # the one-launch Triton forward keeps a [BLOCK_M, r] accumulator next to the output tile
TRITON_MAX_RANK = 256  # the largest padded rank of the Triton kernels' tile tables (kernels/configs.py)


# --------------------------------------------------------------------------------------------------------------
# What a call is, and what runs it
# --------------------------------------------------------------------------------------------------------------
class Call(NamedTuple):
    device: torch.device
    dtype: torch.dtype
    M: int  # rows (plans are kept per power of two: ``bucket``)
    K: int
    N: int
    r: int  # the rank; a mixed batch: the adapters' stacked rank
    dropout: bool
    grads: int  # 0: inference (no grad), 1: grads of the adapters only (x needs none), 2: and of x
    deterministic: bool
    adapters: int = 0  # 0: one adapter; n >= 1: a mixed batch over n adapters
    quant: str = ""  # a quantized W0 (QLoRA): "nf4", "fp4", "int8", "_dq" appended for double quantization
    dora: bool = False  # DoRA: LoRA's variants around its column scale, the forward's on dropout(x) without dropout
    experts: int = 0  # LoRA on MoE experts: the number of experts (M: the slots, token-expert pairs)


class Plan(NamedTuple):
    forward: str
    backward: str
    xa_splits: int = 0  # programs the thin xa kernel may reach by splitting K (0: never split)
    # whether the auxiliary passes around the variants (a dropped x's mask in aten, DoRA's norm and glue, QLoRA's
    # dequantization) run as Triton kernels: set by ``choose`` from the backend asked for (``rules.aux_kernels_for``)
    aux: bool = False

    @property
    def spec(self) -> str:
        """The plan as a string (what the ops receive, what ``backend=`` accepts): "forward+backward[@splits]"."""
        return f"{self.forward}+{self.backward}" + (f"@{self.xa_splits}" if self.xa_splits else "")


def bucket(M: int) -> int:
    """Rows as plans are kept: rounded up to a power of two (0 stays 0)."""
    return 1 << (M - 1).bit_length() if M > 0 else 0


def padded_rank(r: int) -> int:
    return max(16, bucket(r))


@functools.lru_cache(maxsize=256)
def parse_spec(spec: str) -> Plan:
    """"forward+backward[@splits]" -> Plan; raises ValueError naming what is wrong."""
    body, _, splits = spec.partition("@")
    fwd, sep, bwd = body.partition("+")
    single, mixed = fwd in FORWARDS and bwd in BACKWARDS, fwd in MIXED_FORWARDS and bwd in MIXED_BACKWARDS
    experts = fwd in EXPERTS_FORWARDS and bwd in EXPERTS_BACKWARDS
    if not sep or not (single or mixed or experts) or (splits and not splits.isdigit()):
        raise ValueError(
            f"backend: unknown name {spec!r}; expected 'auto', a backend ({', '.join(map(repr, FAMILIES))}) or a plan "
            f"'forward+backward[@xa_splits]' with forward in {FORWARDS} (mixed batches {MIXED_FORWARDS}, experts "
            f"{EXPERTS_FORWARDS}) and backward in {BACKWARDS} (mixed {MIXED_BACKWARDS}, experts {EXPERTS_BACKWARDS})")
    return Plan(fwd, bwd, int(splits or 0))


def check_name(name: str) -> str:
    """Raise a ValueError unless `name` is 'auto', a backend family or a valid plan spec; returns it."""
    if not isinstance(name, str):
        raise ValueError(f"backend: expected a string, got {type(name).__name__}")
    if name not in NAMES:
        parse_spec(name)
    return name
