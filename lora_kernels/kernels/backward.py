"""Fused LoRA backward in Triton: dX, dA and dB in one launch, or dA and dB alone when x needs no grad.

With G = scaling * dY B [M, r] and D the dropout mask scaled by 1 / (1 - p):
    dX = dY W0 + (G A) * D,   dA = G^T (X * D),   dB = scaling * dY^T XA.

``lora_bwd_dx_kernel``: one program per [BLOCK_M, BLOCK_K] tile of dX streams its rows of dY once over N,
feeding two dots, dY W0 and dY B (G is recomputed by each column of programs: r / BLOCK_K extra MMA work,
no extra memory traffic). Its epilogue adds (G A) * D, and, from the x tile it loads there, adds its share
G^T (X * D) of dA. The dB work is spread over the columns of programs: the program in column c also
adds scaling * dY^T XA for the N-blocks j with j % (number of columns) == c, from the dY tiles it has loaded
anyway. The dropout mask is regenerated from the seed, never read from memory.

``lora_bwd_ab_kernel``: one program per BLOCK_M rows; dY rows once over N (G and dB), then x rows once over
K (dA). No dY W0 GEMM.

dA and dB accumulate in fp32: atomically by default, or, when torch's deterministic algorithms are
enabled, into per-row-block partial buffers summed afterwards in a fixed order (bitwise repeatable).
"""

import torch
import triton
import triton.language as tl

from .configs import (AB_CONFIGS, BACKWARD_CONFIGS, INTERPRET, dot_precision, fixed_config, m_bucket,
                      prune_configs)
from .dropout import dropout_args, dropout_keep
from .forward import _tile_ids, block_r
from .memory import empty


@triton.jit
def _accumulate(ptr, value, mask, DETERMINISTIC: tl.constexpr):
    if DETERMINISTIC:
        tl.store(ptr, value, mask=mask)  # each partial-buffer element has exactly one writer
    else:
        tl.atomic_add(ptr, value, mask=mask)


@triton.autotune(configs=BACKWARD_CONFIGS, key=["M_BUCKET", "N", "K", "BLOCK_R", "DROPOUT"],
                 prune_configs_by={"early_config_prune": prune_configs}, reset_to_zero=["DA", "DB"])
@triton.jit(do_not_specialize=["M_BUCKET"])
def lora_bwd_dx_kernel(
    DY, W, A, B, X, XA, SEED, DX, DA, DB,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_xm, stride_xk, stride_xam, stride_dxm, stride_dxk,
    stride_dap, stride_dbp,
    scaling, threshold, keep_scale,
    M_BUCKET,
    DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_k = _tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    num_k = tl.cdiv(K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    k_ok = offs_k < K
    r_ok = offs_r < R
    cols_k = offs_k % K  # W0 / A columns past K only feed dX columns that are never stored

    dy_ptrs = DY + offs_m.to(tl.int64)[:, None] * stride_dym + offs_n[None, :] * stride_dyn
    w_ptrs = W + offs_n[:, None] * stride_wn + cols_k[None, :] * stride_wk
    b_ptrs = B + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br
    # Rows of dY past M load as zeros, so they add nothing to G, dA or dB.
    xa = tl.load(XA + offs_m.to(tl.int64)[:, None] * stride_xam + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    xa = xa.to(DY.dtype.element_ty)
    if UPCAST:
        xa = xa.to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j in range(0, tl.cdiv(N, BLOCK_N)):
        n_ok = offs_n < N - j * BLOCK_N
        dy = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        g = tl.dot(dy, b, g, input_precision=DOT_PRECISION)
        if j % num_k == pid_k:
            db = tl.dot(tl.trans(dy), xa, input_precision=DOT_PRECISION) * scaling
            rows_n = j * BLOCK_N + offs_n
            _accumulate(DB + pid_m * stride_dbp + rows_n[:, None] * R + offs_r[None, :], db,
                        n_ok[:, None] & r_ok[None, :], DETERMINISTIC)
        dy_ptrs += BLOCK_N * stride_dyn
        w_ptrs += BLOCK_N * stride_wn
        b_ptrs += BLOCK_N * stride_bn

    g = (g * scaling).to(DX.dtype.element_ty)
    a = tl.load(A + offs_r[:, None] * stride_ar + cols_k[None, :] * stride_ak, mask=r_ok[:, None], other=0.0)
    x = tl.load(X + offs_m.to(tl.int64)[:, None] * stride_xm + cols_k[None, :] * stride_xk, mask=m_ok[:, None], other=0.0)
    if DROPOUT:
        keep = dropout_keep(SEED, pid_m * BLOCK_M, pid_k * BLOCK_K, K, threshold, BLOCK_M, BLOCK_K)
        x = tl.where(keep, x, 0.0)
    if UPCAST:
        g = g.to(tl.float32)
        a = a.to(tl.float32)
        x = x.to(tl.float32)
    low_rank = tl.dot(g, a, input_precision=DOT_PRECISION)
    if DROPOUT:
        low_rank = tl.where(keep, low_rank * keep_scale, 0.0)
    acc += low_rank
    tl.store(DX + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxk, acc.to(DX.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])

    da = tl.dot(tl.trans(g), x, input_precision=DOT_PRECISION)
    if DROPOUT:
        da *= keep_scale
    _accumulate(DA + pid_m * stride_dap + offs_r[:, None] * K + offs_k[None, :], da,
                r_ok[:, None] & k_ok[None, :], DETERMINISTIC)


@triton.autotune(configs=AB_CONFIGS, key=["M_BUCKET", "N", "K", "BLOCK_R", "DROPOUT"],
                 prune_configs_by={"early_config_prune": prune_configs}, reset_to_zero=["DA", "DB"])
@triton.jit(do_not_specialize=["M_BUCKET"])
def lora_bwd_ab_kernel(
    DY, A, B, X, XA, SEED, DA, DB,
    M, N, K, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xm, stride_xk, stride_xam,
    stride_dap, stride_dbp,
    scaling, threshold, keep_scale,
    M_BUCKET,
    DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    xa = tl.load(XA + offs_m.to(tl.int64)[:, None] * stride_xam + offs_r[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    xa = xa.to(DY.dtype.element_ty)
    if UPCAST:
        xa = xa.to(tl.float32)

    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_ok = offs_n < N - n0
        dy = tl.load(DY + offs_m.to(tl.int64)[:, None] * stride_dym + (n0 + offs_n)[None, :] * stride_dyn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = tl.load(B + (n0 + offs_n)[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
        g = tl.dot(dy, b, g, input_precision=DOT_PRECISION)
        db = tl.dot(tl.trans(dy), xa, input_precision=DOT_PRECISION) * scaling
        _accumulate(DB + pid_m * stride_dbp + (n0 + offs_n)[:, None] * R + offs_r[None, :], db,
                    n_ok[:, None] & r_ok[None, :], DETERMINISTIC)

    g_t = tl.trans((g * scaling).to(X.dtype.element_ty))
    if UPCAST:
        g_t = g_t.to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(X + offs_m.to(tl.int64)[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            keep = dropout_keep(SEED, pid_m * BLOCK_M, k0, K, threshold, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, 0.0)
        if UPCAST:
            x = x.to(tl.float32)
        da = tl.dot(g_t, x, input_precision=DOT_PRECISION)
        if DROPOUT:
            da *= keep_scale
        _accumulate(DA + pid_m * stride_dap + offs_r[:, None] * K + (k0 + offs_k)[None, :], da,
                    r_ok[:, None] & k_ok[None, :], DETERMINISTIC)


def lora_backward(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling: float, dropout_p: float,
                  need_dx: bool, deterministic: bool):
    """Launch the backward on 2-D tensors; returns (dx [M, K] or an empty tensor, dA [r, K], dB [N, r])."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    dev = x.device
    dx = empty((M, K) if need_dx else (0,), dev, x.dtype)
    xa = xa.contiguous()  # the kernels index its rank dimension with unit stride
    if M == 0:
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    kernel = lora_bwd_dx_kernel if need_dx else lora_bwd_ab_kernel
    br = block_r(R)
    threshold, keep_scale = dropout_args(dropout_p)
    common = dict(DROPOUT=dropout_p > 0.0, DETERMINISTIC=deterministic, BLOCK_R=br,
                  DOT_PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET)
    launch = kernel
    if deterministic:
        cfg = fixed_config(kernel.configs, x.element_size(), br)
        parts = triton.cdiv(M, cfg.kwargs["BLOCK_M"])
        launch = kernel.fn
        common.update(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        da = empty((parts, R, K), dev, torch.float32)
        db = empty((parts, N, R), dev, torch.float32)
    else:
        da = torch.zeros((1, R, K), device=dev, dtype=torch.float32)
        db = torch.zeros((1, N, R), device=dev, dtype=torch.float32)
    stride_dap = da.stride(0) if deterministic else 0
    stride_dbp = db.stride(0) if deterministic else 0
    seed_arg = seed if seed is not None else x
    scalars = (float(scaling), threshold, keep_scale, m_bucket(M))
    if need_dx:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)
        launch[grid](
            grad_y, weight, lora_A, lora_B, x, xa, seed_arg, dx, da, db,
            M, N, K, R,
            grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
            lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
            x.stride(0), x.stride(1), xa.stride(0), dx.stride(0), dx.stride(1),
            stride_dap, stride_dbp, *scalars, **common,
        )
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)
        launch[grid](
            grad_y, lora_A, lora_B, x, xa, seed_arg, da, db,
            M, N, K, R,
            grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1),
            x.stride(0), x.stride(1), xa.stride(0),
            stride_dap, stride_dbp, *scalars, **common,
        )
    # Partial buffers are reduced in a fixed order; the atomic path has a single slice.
    grad_A = da.sum(0) if deterministic else da[0]
    grad_B = db.sum(0) if deterministic else db[0]
    return dx, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype)
