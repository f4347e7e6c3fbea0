"""QLoRA's base weight read in its quantized form (bitsandbytes' NF4 / FP4 / int8), in Triton.

Element f = n K + k of W0 [N, K] (row-major) is stored as
    4-bit: the nibble of byte f // 2 (the high one for even f), worth CODE[nibble] * absmax[f // blocksize];
           with double quantization absmax itself is 8-bit: CODE2[byte] * ABSMAX2[block // blocksize2] + offset;
    int8:  Q[n, k] * scale[n] (scale = the row's absmax / 127),
each value computed in fp32 and rounded once to the compute dtype: the very matrix that dequantize-then-matmul would
multiply by (``reference.dequantize``).

* ``dequantize`` writes that matrix (one launch, double quantization decoded in place): what every other variant
  multiplies by, transiently, in the forward and again in the backward's dX.
* ``lora_forward_quantized`` (the planner's ``triton_quantized``) never writes it: the GEMM dequantizes each W0 tile
  in its K loop, and the low-rank term (s xa) B^T runs as extra K steps over r in the same program (xa = dropout(x)
  A^T from the thin xa kernel first). At decode sizes the forward is bound by reading W0; 4-bit W0 is about 3.6x
  fewer bytes than bf16.
"""

import torch
import triton
import triton.language as tl

from .configs import AUTOTUNE_KWARGS, INTERPRET, QUANT_CONFIGS, dot_precision, m_bucket, prune_configs
from .forward import launch_xa, tile_ids
from .memory import empty
from .numerics import as_type, rounded

DEQUANT_BLOCK = 1024  # elements per program of the dequantization pass


@triton.jit
def quantized_values(Q, ABSMAX, CODE, ABSMAX2, CODE2, offset, f, n, mask, BLOCKSIZE: tl.constexpr,
                     BLOCKSIZE2: tl.constexpr, INT8: tl.constexpr, NESTED: tl.constexpr):
    """fp32 values of W0's elements at flat indices f of rows n (any matching shapes). The block sizes are
    compile-time constants (bitsandbytes' are powers of two: the block indices are shifts)."""
    if INT8:
        v = tl.load(Q + f, mask=mask, other=0).to(tl.float32) * tl.load(ABSMAX + n, mask=mask, other=0.0)
    else:
        byte = tl.load(Q + f // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(f % 2 == 0, byte >> 4, byte & 0xF)
        block = f // BLOCKSIZE
        if NESTED:
            scale = tl.load(CODE2 + tl.load(ABSMAX + block, mask=mask, other=0).to(tl.int32)) \
                * tl.load(ABSMAX2 + block // BLOCKSIZE2, mask=mask, other=0.0) + offset
        else:
            scale = tl.load(ABSMAX + block, mask=mask, other=0.0)
        v = tl.load(CODE + nibble) * scale
    return v


@triton.jit
def dequantize_kernel(Q, ABSMAX, CODE, ABSMAX2, CODE2, W, N, K, offset, BLOCKSIZE: tl.constexpr,
                      BLOCKSIZE2: tl.constexpr, INT8: tl.constexpr, NESTED: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK: tl.constexpr):
    f = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = f < N.to(tl.int64) * K
    v = quantized_values(Q, ABSMAX, CODE, ABSMAX2, CODE2, offset, f, f // K, ok, BLOCKSIZE, BLOCKSIZE2, INT8, NESTED)
    tl.store(W + f, rounded(v, W.dtype.element_ty, UPCAST), mask=ok)


@triton.autotune(configs=QUANT_CONFIGS, key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": prune_configs}, **AUTOTUNE_KWARGS)
@triton.jit(do_not_specialize=["M_BUCKET"])
def lora_fwd_quantized_kernel(
    X, Q, ABSMAX, CODE, ABSMAX2, CODE2, BIAS, B, XA, Y,
    M, N, K, R,
    stride_xm, stride_xk, stride_bn, stride_br, stride_bias, stride_xam, stride_ym,
    scaling, offset,
    M_BUCKET,
    BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    HAS_BIAS: tl.constexpr, INT8: tl.constexpr, NESTED: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x W0^T + bias + (scaling xa) B^T with W0 dequantized tile by tile ([BLOCK_K, BLOCK_N] per K step, rounded
    to x's type as the dequantized matrix would be); xa [M, r] fp32 is read (the thin kernel made it). W0's flat
    indices are 32-bit (N K < 2**31, which the planner checks): a tile's indices stay in half the registers."""
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M  # out-of-range rows / columns wrap around: loads stay in bounds, stores are masked
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    col_base = cols[None, :] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        f = col_base + (k0 + offs_k)[:, None]
        w = quantized_values(Q, ABSMAX, CODE, ABSMAX2, CODE2, offset, f, cols[None, :], k_ok[:, None], BLOCKSIZE,
                             BLOCKSIZE2, INT8, NESTED)
        w = as_type(w, X.dtype.element_ty, UPCAST)
        if UPCAST:
            x = x.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
    for r0 in range(0, R, BLOCK_K):  # the low-rank term: extra K steps over r
        r_ok = offs_k < R - r0
        xs = tl.load(XA + rows.to(tl.int64)[:, None] * stride_xam + (r0 + offs_k)[None, :], mask=r_ok[None, :],
                     other=0.0)
        xs = as_type(xs * scaling, Y.dtype.element_ty, UPCAST)
        b = as_type(tl.load(B + cols[None, :] * stride_bn + (r0 + offs_k)[:, None] * stride_br, mask=r_ok[:, None],
                            other=0.0), Y.dtype.element_ty, UPCAST)
        acc = tl.dot(xs, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols * stride_bias).to(tl.float32)[None, :]
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, rounded(acc, Y.dtype.element_ty, UPCAST), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _state_args(qw):
    """Kernel arguments of a QuantizedWeight (lora_kernels.quantized): the tensors, offset, block sizes, flags."""
    nested = qw.absmax2.numel() > 0
    code = qw.code if qw.code.numel() else qw.absmax
    return ((qw.data, qw.absmax, code, qw.absmax2 if nested else qw.absmax, qw.code2 if nested else qw.absmax),
            float(qw.offset), max(qw.blocksize, 1), max(qw.blocksize2, 1), qw.fmt == "int8", nested)


def dequantize(qw, dtype: torch.dtype) -> torch.Tensor:
    """W0 [N, K] in `dtype` from a QuantizedWeight, in one launch."""
    N, K = qw.shape
    w = empty((N, K), qw.data.device, dtype)
    if N * K == 0:
        return w
    tensors, offset, blocksize, blocksize2, int8, nested = _state_args(qw)
    dequantize_kernel[(triton.cdiv(N * K, DEQUANT_BLOCK),)](
        *tensors, w, N, K, offset, BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2, INT8=int8, NESTED=nested,
        UPCAST=INTERPRET, BLOCK=DEQUANT_BLOCK)
    return w


def lora_forward_quantized(x, qw, bias, lora_A, lora_B, seed, scaling: float, dropout_p: float, save_xa: bool,
                           xa_splits: int = 0):
    """The forward on 2-D x [M, K] over a quantized W0: (y [M, N], xa [M, r] fp32 or an empty tensor)."""
    M, K = x.shape
    N, R = qw.shape[0], lora_A.shape[0]
    xa = empty((M, R), x.device, torch.float32)
    y = empty((M, N), x.device, x.dtype)
    if M == 0:
        return y, (xa if save_xa else xa.new_empty((0,)))
    launch_xa(x, lora_A, xa, None, seed, scaling, dropout_p, split_target=xa_splits)
    if lora_B.dtype != x.dtype:  # fp32 master adapters: B streamed in x's type (as _launch_gemm does)
        lora_B = lora_B.to(x.dtype)
    tensors, offset, blocksize, blocksize2, int8, nested = _state_args(qw)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    lora_fwd_quantized_kernel[grid](
        x, *tensors, bias if bias is not None else x, lora_B, xa, y,
        M, N, K, R,
        x.stride(0), x.stride(1), lora_B.stride(0), lora_B.stride(1), bias.stride(0) if bias is not None else 0,
        xa.stride(0), y.stride(0),
        float(scaling), offset, m_bucket(M), BLOCKSIZE=blocksize, BLOCKSIZE2=blocksize2,
        HAS_BIAS=bias is not None, INT8=int8, NESTED=nested, BLOCK_R=16, DOT_PRECISION=dot_precision(x.dtype),
        UPCAST=INTERPRET,
    )
    return y, (xa if save_xa else xa.new_empty((0,)))
