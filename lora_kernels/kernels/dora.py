"""DoRA's passes around the LoRA kernels, in Triton: the row norms of W0 + s B A in one pass over W0, the magnitude's
column scale in the forward's output, and in the backward the scaled dY with the magnitude's grad in one pass.

    norm_n  = sqrt(||W0_n||^2 + 2 s sum_j B_nj (W0 A^T)_nj + s^2 sum_jk B_nj (A A^T)_jk B_nk)   (no [N, K] tensor;
              the kernel makes W0 A^T and the squares in one pass over W0, the rest is [N, r])
    y       = g * P + bias (+ extra)                  g = magnitude / norm, in fp32, rounded once
    dY_g    = dY * g;  dm partial = sum over a block of rows of dY * P (fp32, one slot per row block: summed in order)
"""

import torch
import triton
import triton.language as tl

from .configs import INTERPRET
from .forward import block_r
from .memory import empty
from .numerics import rounded


@triton.jit
def dora_norm_kernel(W, A, WA, SQ, N, K, R, stride_wn, stride_wk, stride_ar, stride_ak, HAS_SQ: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per BLOCK_N rows of W0: W0 A^T [BLOCK_N, R] and (unless HAS_SQ) the rows' squared norms,
    accumulated in fp32 over K with the adapters as stored (fp32 masters stay fp32): one pass over W0."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    n_ok = offs_n < N
    r_ok = offs_r < R
    wa = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        w = tl.load(W + offs_n.to(tl.int64)[:, None] * stride_wn + (k0 + offs_k)[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        a = tl.load(A + offs_r[None, :] * stride_ar + (k0 + offs_k)[:, None] * stride_ak,
                    mask=r_ok[None, :] & k_ok[:, None], other=0.0).to(tl.float32)
        wa = tl.dot(w, a, wa, input_precision="ieee")
        if not HAS_SQ:
            sq += tl.sum(w * w, axis=1)
    tl.store(WA + offs_n.to(tl.int64)[:, None] * R + offs_r[None, :], wa, mask=n_ok[:, None] & r_ok[None, :])
    if not HAS_SQ:
        tl.store(SQ + offs_n, sq, mask=n_ok)


@triton.jit
def dora_scale_kernel(P, G, BIAS, EXTRA, Y, M, N, stride_pm, stride_em, stride_ym, HAS_BIAS: tl.constexpr,
                      HAS_EXTRA: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y = P * g + bias (+ EXTRA), in fp32, rounded once to Y's type."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows = offs_m.to(tl.int64)[:, None]
    acc = tl.load(P + rows * stride_pm + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
    acc = acc * tl.load(G + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if HAS_EXTRA:
        acc += tl.load(EXTRA + rows * stride_em + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + rows * stride_ym + offs_n[None, :], rounded(acc, Y.dtype.element_ty, UPCAST), mask=ok)


@triton.jit
def dora_grad_kernel(DY, P, G, DYG, REST, DM, M, N, stride_dym, stride_dyn, stride_pm, stride_om,
                     HAS_REST: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """DYG = dY * g; REST = dY * (1 - g) (dropout's extra dX term); DM[row block, n] = sum of dY * P over the block's
    rows, in fp32: one read of dY and P."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    ok = (offs_m[:, None] < M) & n_ok[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    dy = tl.load(DY + rows * stride_dym + offs_n[None, :] * stride_dyn, mask=ok, other=0.0).to(tl.float32)
    p = tl.load(P + rows * stride_pm + offs_n[None, :], mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G + offs_n, mask=n_ok, other=0.0)[None, :]
    tl.store(DYG + rows * stride_om + offs_n[None, :], rounded(dy * g, DYG.dtype.element_ty, UPCAST), mask=ok)
    if HAS_REST:
        tl.store(REST + rows * stride_om + offs_n[None, :], rounded(dy - dy * g, REST.dtype.element_ty, UPCAST),
                 mask=ok)
    tl.store(DM + pid_m * N + offs_n, tl.sum(dy * p, axis=0), mask=n_ok)


EW_BLOCK = (32, 32) if INTERPRET else (32, 128)  # elementwise tiles (rows, columns)


def norm_block(block_r: int) -> tuple[int, int]:
    """(rows, K step) of the norm kernel for a padded rank: the fp32 accumulator [rows, r] and A's K step x r tile
    stay small (compiled for sm_80 / sm_90 without spills or shared-memory overflow by aot_check)."""
    if INTERPRET:
        return 32, 32
    return {16: (64, 64), 32: (32, 32), 64: (32, 32), 128: (32, 32)}.get(block_r, (16, 32))


def weight_norm(weight, lora_A, lora_B, scaling: float, w0_sq=None):
    """(||W0_n + s (B A)_n|| fp32 [N], ||W0_n||^2 fp32 [N]): W0 A^T and the squares in one pass over W0 (the squares
    skipped when known), then ||W0_n||^2 + 2 s rowsum((W0 A^T) B) + s^2 rowsum((B A A^T) B) on [N, r] tensors."""
    N, K = weight.shape
    R = lora_A.shape[0]
    br = block_r(R)
    wa = empty((N, R), weight.device, torch.float32)
    sq = w0_sq if w0_sq is not None else empty((N,), weight.device, torch.float32)
    bn, bk = norm_block(br)
    if N:
        dora_norm_kernel[(triton.cdiv(N, bn),)](
            weight, lora_A, wa, sq, N, K, R, weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
            HAS_SQ=w0_sq is not None, BLOCK_R=br, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=2)
    a, b = lora_A.float(), lora_B.float()
    total = torch.addcmul(sq, (wa * b).sum(1), torch.tensor(2.0 * scaling, device=weight.device))
    total += (scaling * scaling) * ((b @ (a @ a.t())) * b).sum(1)
    return total.clamp_min_(0.0).sqrt_(), sq


def scale(product, g, bias, extra, out_dtype):
    """g * product + bias (+ extra) in one pass (product, extra [M, N]; g fp32 [N])."""
    M, N = product.shape
    y = empty((M, N), product.device, out_dtype)
    bm, bn = EW_BLOCK
    if M and N:
        dora_scale_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            product, g, bias if bias is not None else g, extra if extra is not None else product, y, M, N,
            product.stride(0), extra.stride(0) if extra is not None else 0, y.stride(0), HAS_BIAS=bias is not None,
            HAS_EXTRA=extra is not None, UPCAST=INTERPRET, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return y


def grad_scale(grad_y, product, g, rest: bool):
    """(dY * g, dY * (1 - g) or None, sum over rows of dY * product in fp32 [N]) in one pass over dY and product."""
    M, N = grad_y.shape
    bm, bn = EW_BLOCK
    gy = empty((M, N), grad_y.device, grad_y.dtype)
    other = empty((M, N), grad_y.device, grad_y.dtype) if rest else None
    parts = empty((triton.cdiv(M, bm), N), grad_y.device, torch.float32)
    if M and N:
        dora_grad_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
            grad_y, product, g, gy, other if rest else gy, parts, M, N, grad_y.stride(0), grad_y.stride(1),
            product.stride(0), gy.stride(0), HAS_REST=rest, UPCAST=INTERPRET, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return gy, other, parts.sum(0)  # the row blocks' partial sums, added in a fixed order
