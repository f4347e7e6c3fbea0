"""LoRA backward in Triton: dX, dA and dB (W0 frozen).

With G = scaling * dY B [M, r] and D the dropout mask scaled by 1 / (1 - p):
    dX = dY W0 + (G A) * D,   dA = G^T (X * D),   dB = scaling * dY^T XA.

Two variants; which one runs is the planner's choice (lora_kernels/plan/), passed in as ``variant``
(every product by cuBLAS is the ``aten`` variant of lora_kernels/backends.py):

* ``split``: one Triton launch does all the low-rank work, ``lora_bwd_lowrank_kernel``:
  one program per BLOCK_M rows streams its dY rows once over N (G), then its x rows once over K, where it
  regenerates the dropout mask, adds its share of dA and, when x needs a grad, stores (G A) * D into dX.
  The two large products are left to cuBLAS: dX += dY W0 in place (beta = 1, so the low-rank term is read
  in the GEMM's epilogue instead of in an extra pass) and dB = dY^T (scaling * XA). On an H100 (bf16,
  M=8192, K=N=4096) a Triton dY W0 reached 0.5x the speed of cuBLAS, so the one-launch kernel below loses
  to this split at every size measured (docs/design.md has the figures).
* ``fused`` (one launch, ``lora_bwd_dx_kernel``): one program per [BLOCK_M, BLOCK_K] tile of dX streams
  its rows of dY once over N, feeding dY W0 and dY B; the epilogue adds (G A) * D and the program's share of
  dA; the dB work is spread over the columns of programs (column c adds scaling * dY^T XA for the N-blocks
  j with j % columns == c, from dY tiles it has loaded anyway).

dA (and dB in ``fused``) accumulate in fp32: atomically by default, or, when torch's deterministic
algorithms are enabled, into per-row-block partial buffers summed afterwards in a fixed order (bitwise
repeatable).
"""

import torch
import triton
import triton.language as tl

from .configs import (AUTOTUNE_KWARGS, BACKWARD_CONFIGS, INTERPRET, LOWRANK_CONFIGS, dot_precision, fixed_config,
                      m_bucket, prune_configs)
from .dropout import dropout_args, dropout_keep
from .forward import tile_ids, block_r, row_gate
from .memory import empty
from .numerics import as_type, rounded


@triton.jit
def _accumulate(ptr, value, mask, DETERMINISTIC: tl.constexpr):
    if DETERMINISTIC:
        tl.store(ptr, value, mask=mask)  # each partial-buffer element has exactly one writer
    else:
        tl.atomic_add(ptr, value, mask=mask)


@triton.autotune(configs=BACKWARD_CONFIGS, key=["M_BUCKET", "N", "K", "BLOCK_R", "DROPOUT"],
                 prune_configs_by={"early_config_prune": prune_configs}, reset_to_zero=["DA", "DB"],
                 **AUTOTUNE_KWARGS)
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
    pid_m, pid_k = tile_ids(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
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
    xa = as_type(xa, DY.dtype.element_ty, UPCAST)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j in range(0, tl.cdiv(N, BLOCK_N)):
        n_ok = offs_n < N - j * BLOCK_N
        dy = tl.load(dy_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
        b = as_type(tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0), DY.dtype.element_ty, UPCAST)
        if UPCAST:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
        g = tl.dot(dy, b, g, input_precision=DOT_PRECISION)
        if j % num_k == pid_k:
            # dY^T is loaded transposed (an L1/L2 hit) rather than tl.trans'ed: with fp32 tiles on sm_90
            # the transposed register tile fed tl.dot wrong values (Triton 3.6).
            dyt = tl.load(DY + offs_m.to(tl.int64)[None, :] * stride_dym + (j * BLOCK_N + offs_n)[:, None] * stride_dyn,
                          mask=m_ok[None, :] & n_ok[:, None], other=0.0)
            if UPCAST:
                dyt = dyt.to(tl.float32)
            db = tl.dot(dyt, xa, input_precision=DOT_PRECISION) * scaling
            rows_n = j * BLOCK_N + offs_n
            _accumulate(DB + pid_m * stride_dbp + rows_n[:, None] * R + offs_r[None, :], db,
                        n_ok[:, None] & r_ok[None, :], DETERMINISTIC)
        dy_ptrs += BLOCK_N * stride_dyn
        w_ptrs += BLOCK_N * stride_wn
        b_ptrs += BLOCK_N * stride_bn

    g = as_type(g * scaling, DX.dtype.element_ty, UPCAST)
    a = as_type(tl.load(A + offs_r[:, None] * stride_ar + cols_k[None, :] * stride_ak, mask=r_ok[:, None],
                        other=0.0), DX.dtype.element_ty, UPCAST)
    x = tl.load(X + offs_m.to(tl.int64)[:, None] * stride_xm + cols_k[None, :] * stride_xk, mask=m_ok[:, None], other=0.0)
    if DROPOUT:
        keep = dropout_keep(SEED, pid_m * BLOCK_M, pid_k * BLOCK_K, K, threshold, BLOCK_M, BLOCK_K)
        x = tl.where(keep, x, 0.0)
    if UPCAST:
        x = x.to(tl.float32)
    low_rank = tl.dot(g, a, input_precision=DOT_PRECISION)
    if DROPOUT:
        low_rank = tl.where(keep, low_rank * keep_scale, 0.0)
    acc += low_rank
    tl.store(DX + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             rounded(acc, DX.dtype.element_ty, UPCAST),
             mask=m_ok[:, None] & k_ok[None, :])

    da = tl.dot(tl.trans(g), x, input_precision=DOT_PRECISION)
    if DROPOUT:
        da *= keep_scale
    _accumulate(DA + pid_m * stride_dap + offs_r[:, None] * K + offs_k[None, :], da,
                r_ok[:, None] & k_ok[None, :], DETERMINISTIC)


@triton.autotune(configs=LOWRANK_CONFIGS, key=["M_BUCKET", "N", "K", "BLOCK_R", "DROPOUT", "NEED_DX", "GATED"],
                 prune_configs_by={"early_config_prune": prune_configs}, reset_to_zero=["DA"], **AUTOTUNE_KWARGS)
@triton.jit(do_not_specialize=["M_BUCKET"])
def lora_bwd_lowrank_kernel(
    DY, A, B, X, SEED, DX, DA, IDS, OWNER, SCALES, THR, KS,
    M, N, K, R,
    stride_dym, stride_dyn, stride_ar, stride_ak, stride_bn, stride_br, stride_xm, stride_xk,
    stride_dxm, stride_dxk, stride_dap,
    scaling, threshold, keep_scale,
    M_BUCKET,
    DROPOUT: tl.constexpr, DETERMINISTIC: tl.constexpr, NEED_DX: tl.constexpr, GATED: tl.constexpr,
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

    # G = dY B over N; rows of dY past M load as zeros, so they add nothing to dA.
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_ok = offs_n < N - n0
        dy = tl.load(DY + offs_m.to(tl.int64)[:, None] * stride_dym + (n0 + offs_n)[None, :] * stride_dyn,
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        b = as_type(tl.load(B + (n0 + offs_n)[:, None] * stride_bn + offs_r[None, :] * stride_br,
                            mask=n_ok[:, None] & r_ok[None, :], other=0.0), DY.dtype.element_ty, UPCAST)
        if UPCAST:
            dy = dy.to(tl.float32)
        g = tl.dot(dy, b, g, input_precision=DOT_PRECISION)
    if GATED:
        # mixed batch: each row's G keeps its own adapter's ranks, times that adapter's scaling and (folded in
        # here, so keep_scale is 1 below) its 1 / (1 - p); the mask uses the row's own threshold
        gate, row_threshold, row_keep_scale = row_gate(IDS, OWNER, SCALES, THR, KS, offs_m % M, offs_r, R)
        g = g * gate
        if DROPOUT:
            g = g * row_keep_scale
    else:
        g = g * scaling
        row_threshold = threshold
    g = as_type(g, X.dtype.element_ty, UPCAST)
    g_t = tl.trans(g)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(X + offs_m.to(tl.int64)[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DROPOUT:
            keep = dropout_keep(SEED, pid_m * BLOCK_M, k0, K, row_threshold, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, 0.0)
        if UPCAST:
            x = x.to(tl.float32)
        da = tl.dot(g_t, x, input_precision=DOT_PRECISION)
        if DROPOUT:
            da *= keep_scale
        _accumulate(DA + pid_m * stride_dap + offs_r[:, None] * K + (k0 + offs_k)[None, :], da,
                    r_ok[:, None] & k_ok[None, :], DETERMINISTIC)
        if NEED_DX:
            # The low-rank part of dX, (G A) * D; cuBLAS adds dY W0 to it afterwards.
            a = as_type(tl.load(A + offs_r[:, None] * stride_ar + (k0 + offs_k)[None, :] * stride_ak,
                                mask=r_ok[:, None] & k_ok[None, :], other=0.0), X.dtype.element_ty, UPCAST)
            low_rank = tl.dot(g, a, input_precision=DOT_PRECISION)
            if DROPOUT:
                low_rank = tl.where(keep, low_rank * keep_scale, 0.0)
            tl.store(DX + offs_m.to(tl.int64)[:, None] * stride_dxm + (k0 + offs_k)[None, :] * stride_dxk,
                     rounded(low_rank, DX.dtype.element_ty, UPCAST), mask=m_ok[:, None] & k_ok[None, :])


def _partials(kernel, deterministic, x, br, M, shapes):
    """fp32 accumulators for dA (and dB): one zeroed slice for atomics, or one slice per row block when
    deterministic (then the config is fixed, since the number of slices follows BLOCK_M)."""
    dev = x.device
    if not deterministic:
        return kernel, {}, [torch.zeros((1, *sh), device=dev, dtype=torch.float32) for sh in shapes]
    cfg = fixed_config(kernel.configs, x.element_size(), br)
    parts = triton.cdiv(M, cfg.kwargs["BLOCK_M"])
    meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return kernel.fn, meta, [empty((parts, *sh), dev, torch.float32) for sh in shapes]


def _total(buffer, deterministic):
    """The accumulated grad: partial buffers are summed in a fixed order; the atomic path has a single slice."""
    return buffer.sum(0) if deterministic else buffer[0]


def _split(grad_y, x, weight, lora_A, lora_B, xa, seed_arg, scalars, common, need_dx, deterministic, gating=None):
    """The split backward: the low-rank kernel, then cuBLAS for dY W0 (in place, beta = 1) and dB = dY^T xs.
    xs is scaling * xa, or with `gating` (mixed batch) xa itself, which is already gated and scaled."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    dx = empty((M, K) if need_dx else (0,), x.device, x.dtype)
    launch, meta, (da,) = _partials(lora_bwd_lowrank_kernel, deterministic, x, common["BLOCK_R"], M, [(R, K)])
    grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]),)
    launch[grid](
        grad_y, lora_A, lora_B, x, seed_arg, dx if need_dx else x, da, *(gating if gating is not None else (x,) * 5),
        M, N, K, R,
        grad_y.stride(0), grad_y.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), x.stride(0), x.stride(1),
        dx.stride(0) if need_dx else 0, dx.stride(1) if need_dx else 0,
        da.stride(0) if deterministic else 0, *scalars, NEED_DX=need_dx, GATED=gating is not None,
        **common, **meta,
    )
    if need_dx:
        dx.addmm_(grad_y, weight)  # cuBLAS, beta = 1: dX = dY W0 + the low-rank term already there
    scaling = scalars[0]
    xs = (xa if gating is not None else xa * scaling).to(grad_y.dtype)
    grad_B = torch.mm(grad_y.t(), xs)  # cuBLAS: dB = dY^T (scaling * XA)
    return dx, _total(da, deterministic).to(lora_A.dtype), grad_B.to(lora_B.dtype)


def lora_mixed_backward(grad_y, x, weight, lora_A, lora_B, xs, seed, any_dropout: bool, gating, need_dx: bool,
                        deterministic: bool):
    """Backward of forward.lora_mixed_forward (xs: its gated, scaled fp32 product); (dx or empty, dA, dB)."""
    M, K = x.shape
    if M == 0:
        dx = x.new_zeros((M, K) if need_dx else (0,))
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    common = dict(DROPOUT=any_dropout, DETERMINISTIC=deterministic, BLOCK_R=block_r(lora_A.shape[0]),
                  DOT_PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET)
    # scaling, threshold and keep_scale come per row with the gating; 1.0 / 0 / 1.0 are placeholders
    scalars = (1.0, 0, 1.0, m_bucket(M))
    return _split(grad_y, x, weight, lora_A, lora_B, xs.contiguous(), seed if seed is not None else x, scalars,
                  common, need_dx, deterministic, gating)


def lora_backward(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling: float, dropout_p: float,
                  need_dx: bool, deterministic: bool, variant: str):
    """Backward on 2-D tensors as `variant` (split, fused); returns (dx [M, K] or an empty tensor, dA [r, K],
    dB [N, r])."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if M == 0:
        dx = x.new_zeros((M, K) if need_dx else (0,))
        return dx, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    xa = xa.contiguous()  # the kernels index its rank dimension with unit stride
    br = block_r(R)
    threshold, keep_scale = dropout_args(dropout_p)
    common = dict(DROPOUT=dropout_p > 0.0, DETERMINISTIC=deterministic, BLOCK_R=br,
                  DOT_PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET)
    seed_arg = seed if seed is not None else x
    scalars = (float(scaling), threshold, keep_scale, m_bucket(M))
    if variant == "split":
        return _split(grad_y, x, weight, lora_A, lora_B, xa, seed_arg, scalars, common, need_dx, deterministic)

    if variant != "fused":
        raise ValueError(f"variant: expected 'split' or 'fused', got {variant!r}")
    if not need_dx:
        raise ValueError("variant 'fused' computes dX; use 'split' when x needs no grad")
    grad_dtype = lora_A.dtype
    if grad_dtype != x.dtype:  # fp32 master adapters: rounded here (fp32 A tiles at wide ranks spill registers)
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    dx = empty((M, K), x.device, x.dtype)
    launch, meta, (da, db) = _partials(lora_bwd_dx_kernel, deterministic, x, br, M, [(R, K), (N, R)])
    grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(K, m["BLOCK_K"]),)
    launch[grid](
        grad_y, weight, lora_A, lora_B, x, xa, seed_arg, dx, da, db,
        M, N, K, R,
        grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
        lora_A.stride(0), lora_A.stride(1), lora_B.stride(0), lora_B.stride(1),
        x.stride(0), x.stride(1), xa.stride(0), dx.stride(0), dx.stride(1),
        da.stride(0) if deterministic else 0, db.stride(0) if deterministic else 0, *scalars, **common, **meta,
    )
    return dx, _total(da, deterministic).to(grad_dtype), _total(db, deterministic).to(grad_dtype)
