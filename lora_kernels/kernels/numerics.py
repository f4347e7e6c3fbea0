"""Rounding shared by the kernels: what a value becomes in a lower-precision type, the same in the interpreter."""

import triton
import triton.language as tl


@triton.jit
def as_type(v, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """v rounded to `dtype` (to nearest, ties to even, as GPUs convert). UPCAST (the interpreter, which feeds its dots
    fp32 operands): the rounded value in fp32; its own float32 -> bfloat16 conversion truncates, so bfloat16 rounding
    is done on the bits there."""
    if UPCAST:
        if dtype == tl.bfloat16:
            bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            out = bits.to(tl.float32, bitcast=True)
        else:
            out = v.to(dtype).to(tl.float32)
    else:
        out = v.to(dtype)
    return out


@triton.jit
def rounded(v, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """v in `dtype` for a store, rounded to nearest (in the interpreter too)."""
    return as_type(v, dtype, UPCAST).to(dtype)
