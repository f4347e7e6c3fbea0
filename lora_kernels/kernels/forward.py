"""Fused LoRA forward in Triton: y = x W0^T + bias + scaling * (dropout(x) A^T) B^T.

Three variants; which one runs is the planner's choice (lora_kernels/plan/), passed in as ``variant``:

* ``fused`` (one launch; dropout off, r <= 64): each (m, n) tile program streams its x tile once and
  feeds it to two dots, x W0^T and x A^T. x A^T is recomputed by every column of programs, which costs
  r / BLOCK_N extra MMA work and no extra memory traffic; the programs of column 0 store xa for the
  backward. The epilogue adds (scaling * xa) B^T and the bias.
* ``xa_first`` (two launches): a thin kernel computes xa = dropout(x) A^T once (the dropout mask is generated
  once per element instead of once per column of programs), then the GEMM treats (scaling * xa) B^T as one
  extra K step over r.
* ``cublas`` (large M, where the x W0^T GEMM dominates): the thin kernel computes xa (fp32, for the backward)
  and scaling * xa in x's dtype; cuBLAS writes bias + (scaling * xa) B^T, then adds x W0^T to it in place
  (beta = 1: the low-rank term is read in the GEMM's epilogue, not in an extra pass).

xa is kept in fp32 [M, r] (a few hundred KiB) for the backward.
"""

import weakref

import torch
import triton
import triton.language as tl

from .configs import (AUTOTUNE_KWARGS, FORWARD_CONFIGS, INTERPRET, XA_CONFIGS, dot_precision, m_bucket,
                      prune_configs)
from .dropout import dropout_args, dropout_keep
from .memory import empty
from .numerics import as_type, rounded


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row-tiles share each column of W0 while it sits in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % per_group) % group_size)
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def sorted_window(ORDER, IDS, RSTART, pid_m, M, BLOCK_M: tl.constexpr):
    """Mixed batches with rows in adapter order (ORDER: the rows sorted by adapter id, -1 first; RSTART [n + 1]: the
    first stacked rank of each adapter): the original indices of tile pid_m's rows, and the window [lo, hi) of
    stacked ranks that belongs to the adapters among them (empty when every row is base-only)."""
    rows = tl.load(ORDER + (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M)
    first = tl.load(IDS + tl.load(ORDER + pid_m * BLOCK_M))
    last = tl.load(IDS + tl.load(ORDER + tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1))
    return rows, tl.load(RSTART + tl.maximum(first, 0)), tl.load(RSTART + last + 1)


@triton.autotune(configs=FORWARD_CONFIGS, key=["M_BUCKET", "N", "K", "BLOCK_R", "FUSE_XA", "SORTED"],
                 prune_configs_by={"early_config_prune": prune_configs}, **AUTOTUNE_KWARGS)
@triton.jit(do_not_specialize=["M_BUCKET"])
def lora_fwd_kernel(
    X, W, BIAS, A, B, XA, Y, ORDER, IDS, RSTART,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_bias, stride_xam, stride_ym, stride_yn,
    scaling,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, FUSE_XA: tl.constexpr, STORE_XA: tl.constexpr, SORTED: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """SORTED (a mixed batch, not FUSE_XA): the tile's rows are taken in adapter order (gathered from x, scattered
    to y) and the low-rank steps run over the window of stacked ranks of the tile's adapters only."""
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows/columns wrap around: loads stay in bounds without masks, stores are masked.
    # Row offsets are multiplied by row strides in 64 bits: M x K can pass 2**31 elements.
    if SORTED:
        rows, r_lo, r_hi = sorted_window(ORDER, IDS, RSTART, pid_m, M, BLOCK_M)
        out_rows = rows
    else:
        rows = offs_m % M
        r_lo = 0
        r_hi = R
        out_rows = offs_m
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)

    x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
    a_ptrs = A + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if FUSE_XA:
            # fp32 master adapters next to 16-bit x are rounded to x's type here, as a cast before the call would
            a = as_type(tl.load(a_ptrs, mask=k_ok[:, None] & (offs_r[None, :] < R), other=0.0), X.dtype.element_ty,
                        UPCAST)
            xa = tl.dot(x, a, xa, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if FUSE_XA:
        if STORE_XA:
            if pid_n == 0:
                xa_ptrs = XA + out_rows.to(tl.int64)[:, None] * stride_xam + offs_r[None, :]
                tl.store(xa_ptrs, xa, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
        b = as_type(tl.load(B + cols[None, :] * stride_bn + offs_r[:, None] * stride_br,
                            mask=offs_r[:, None] < R, other=0.0), Y.dtype.element_ty, UPCAST)
        xs = as_type(xa * scaling, Y.dtype.element_ty, UPCAST)
        acc = tl.dot(xs, b, acc, input_precision=DOT_PRECISION)
    else:
        # The low-rank term as extra K steps over r, reading the precomputed fp32 xa.
        for r0 in range(r_lo, r_hi, BLOCK_K):
            r_ok = offs_k < r_hi - r0
            xs = tl.load(XA + rows.to(tl.int64)[:, None] * stride_xam + (r0 + offs_k)[None, :], mask=r_ok[None, :], other=0.0)
            xs = as_type(xs * scaling, Y.dtype.element_ty, UPCAST)
            b = as_type(tl.load(B + cols[None, :] * stride_bn + (r0 + offs_k)[:, None] * stride_br,
                                mask=r_ok[:, None], other=0.0), Y.dtype.element_ty, UPCAST)
            acc = tl.dot(xs, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + cols * stride_bias).to(tl.float32)[None, :]
    y_ptrs = Y + out_rows.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, rounded(acc, Y.dtype.element_ty, UPCAST), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def row_gate(IDS, OWNER, SCALES, THR, KS, rows, offs_r, R):
    """Mixed batches: (gate [BM, BR] = the row's adapter's scaling on that adapter's ranks, else 0, per-row dropout
    threshold [BM, 1], per-row 1 / (1 - p) [BM, 1]). Rows with adapter -1 get a zero gate."""
    ids = tl.load(IDS + rows)
    owner = tl.load(OWNER + offs_r, mask=offs_r < R, other=-2)
    rscale = tl.load(SCALES + tl.maximum(owner, 0), mask=offs_r < R, other=0.0)
    gate = tl.where(owner[None, :] == ids[:, None], rscale[None, :], 0.0)
    adapter = tl.maximum(ids, 0)
    return gate, tl.load(THR + adapter)[:, None], tl.load(KS + adapter)[:, None]


@triton.autotune(configs=XA_CONFIGS, key=["M_BUCKET", "K", "BLOCK_R", "DROPOUT", "GATED", "SPLIT_K", "SORTED"],
                 prune_configs_by={"early_config_prune": prune_configs}, reset_to_zero=["XA"], **AUTOTUNE_KWARGS)
@triton.jit(do_not_specialize=["M_BUCKET"])
def lora_xa_kernel(
    X, A, XA, XS, SEED, IDS, OWNER, SCALES, THR, KS, ORDER, RSTART,
    M, K, R,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_xam, stride_xsm,
    threshold, keep_scale, scaling,
    M_BUCKET,
    DROPOUT: tl.constexpr, STORE_XS: tl.constexpr, GATED: tl.constexpr, SPLIT_K: tl.constexpr,
    SORTED: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """xa[M, r] = dropout(x) A^T in fp32 (and, if STORE_XS, scaling * xa in x's dtype); one program per
    BLOCK_M rows and BLOCK_R ranks. GATED (mixed batches): each row keeps only its own adapter's ranks,
    scaled by that adapter's scaling, with that adapter's dropout probability; xa then holds the scaled term.
    SPLIT_K (few rows: too few programs to keep the memory system busy while streaming A): the third grid
    axis splits K, each program adding its partial sum into the zeroed xa with fp32 atomics.
    SORTED (GATED, no dropout): the tile's rows in adapter order; rank tiles outside the window of the tile's
    adapters skip the K loop and store zeros (xa keeps the gated layout)."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    if SORTED:
        rows, r_lo, r_hi = sorted_window(ORDER, IDS, RSTART, pid_m, M, BLOCK_M)
        out_rows = rows
    else:
        rows = offs_m % M
        out_rows = offs_m
    if GATED:
        gate, row_threshold, row_keep_scale = row_gate(IDS, OWNER, SCALES, THR, KS, rows, offs_r, R)
    else:
        row_threshold = threshold
    if SPLIT_K:
        steps = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(2))
        k_begin = tl.program_id(2) * steps * BLOCK_K
        k_end = tl.minimum(K, k_begin + steps * BLOCK_K)
    else:
        k_begin = 0
        k_end = K
    if SORTED:  # no rank of this tile belongs to the tile's adapters: nothing to sum
        live = (pid_r * BLOCK_R < r_hi) & (pid_r * BLOCK_R + BLOCK_R > r_lo)
        k_end = k_begin + (k_end - k_begin) * live.to(tl.int32)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows.to(tl.int64)[:, None] * stride_xm + (k_begin + offs_k)[None, :] * stride_xk
    a_ptrs = A + offs_r[None, :] * stride_ar + (k_begin + offs_k)[:, None] * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ok = offs_k < k_end - k0
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        if DROPOUT:  # (never with SORTED: the mask is generated for rows in their own order)
            keep = dropout_keep(SEED, pid_m * BLOCK_M, k0, K, row_threshold, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, 0.0)
        a = as_type(tl.load(a_ptrs, mask=k_ok[:, None] & (offs_r[None, :] < R), other=0.0), X.dtype.element_ty,
                    UPCAST)
        if UPCAST:
            x = x.to(tl.float32)
        acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    if GATED:
        if DROPOUT:
            acc *= row_keep_scale
        acc *= gate
    elif DROPOUT:
        acc *= keep_scale  # masking is exact; the 1 / (1 - p) factor is applied once, in fp32
    out_ok = (offs_m[:, None] < M) & (offs_r[None, :] < R)
    xa_ptrs = XA + out_rows.to(tl.int64)[:, None] * stride_xam + offs_r[None, :]
    if SPLIT_K:
        tl.atomic_add(xa_ptrs, acc, mask=out_ok)
    else:
        tl.store(xa_ptrs, acc, mask=out_ok)
    if STORE_XS:
        tl.store(XS + out_rows.to(tl.int64)[:, None] * stride_xsm + offs_r[None, :],
                 rounded(acc * scaling, XS.dtype.element_ty, UPCAST), mask=out_ok)


def block_r(r: int) -> int:
    """Rank padded for tl.dot: a power of two, at least 16 (GPU MMA needs K >= 16)."""
    return max(16, triton.next_power_of_2(r))


# The thin xa kernel splits K when its row x rank tiles are fewer programs than the planner's target, each split
# streaming at least this many K steps (of BLOCK_K) so that it reads a useful chunk of A.
XA_SPLIT_MIN_STEPS = 4


def launch_xa(x, lora_A, xa, xs, seed, scaling, dropout_p, gating=None, any_dropout=False, sort=None,
               split_target=0):
    """gating: None, or (adapter_ids int32 [M], rank_owner int32 [R], scalings fp32 [n], thresholds int32 [n],
    keep_scales fp32 [n]) for a mixed batch, whose dropout comes per row with the gating (dropout_p is then
    unused; any_dropout says whether some adapter drops). sort: None, or (order int32 [M], rank starts int32
    [n + 1]) for the sorted mixed-batch variant (no dropout). split_target: the programs to reach by splitting K
    when the row x rank tiles are fewer (the plan's xa_splits; 0: never; not with xs, whose rounded copy of
    scaling * xa needs the whole sum)."""
    M, K = x.shape
    R = lora_A.shape[0]
    if sort is not None and (any_dropout or dropout_p > 0.0):
        raise ValueError("the sorted mixed-batch variant runs without dropout (its mask follows row positions)")
    threshold, keep_scale = dropout_args(dropout_p)
    xa_br = min(block_r(R), 128)
    gate_args = gating if gating is not None else (x,) * 5
    target = 0 if xs is not None else split_target
    # split when even 16-row tiles give too few programs; the grid then picks the split count per config
    split = target > 0 and triton.cdiv(M, 16) * triton.cdiv(R, xa_br) < target

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(R, xa_br)
        splits = max(1, min(triton.cdiv(K, meta["BLOCK_K"] * XA_SPLIT_MIN_STEPS), target // tiles)) if split else 1
        return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, xa_br), splits

    if split:
        xa.zero_()
    lora_xa_kernel[grid](
        x, lora_A, xa, xs if xs is not None else xa, seed if seed is not None else x, *gate_args,
        *(sort if sort is not None else (x, x)),
        M, K, R,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1), xa.stride(0),
        xs.stride(0) if xs is not None else 0,
        threshold, keep_scale, float(scaling), m_bucket(M),
        DROPOUT=any_dropout if gating is not None else dropout_p > 0.0, STORE_XS=xs is not None,
        GATED=gating is not None, SPLIT_K=split, SORTED=sort is not None, BLOCK_R=xa_br,
        DOT_PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET,
    )


def lora_forward(x, weight, bias, lora_A, lora_B, seed, scaling: float, dropout_p: float, save_xa: bool,
                 variant: str, xa_splits: int = 0):
    """The forward on 2-D x [M, K] as `variant` (fused, xa_first, cublas); returns (y [M, N], xa [M, r] fp32 or an
    empty tensor). xa_splits: the thin xa kernel's split-K target (the plan's)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if variant not in ("fused", "xa_first", "cublas"):
        raise ValueError(f"variant: expected 'fused', 'xa_first' or 'cublas', got {variant!r}")
    need_xa = save_xa or variant != "fused"
    xa = empty((M, R) if need_xa else (0,), x.device, torch.float32)
    if M == 0:
        return empty((M, N), x.device, x.dtype), (xa if save_xa else xa.new_empty((0,)))

    if variant == "cublas":
        xs = empty((M, R), x.device, x.dtype)
        launch_xa(x, lora_A, xa, xs, seed, scaling, dropout_p)
        return _cublas_products(x, weight, bias, lora_B, xs), (xa if save_xa else xa.new_empty((0,)))

    y = empty((M, N), x.device, x.dtype)
    if variant == "xa_first":
        launch_xa(x, lora_A, xa, None, seed, scaling, dropout_p, split_target=xa_splits)
    _launch_gemm(x, weight, bias, lora_A, lora_B, xa, y, scaling, fuse_xa=variant == "fused", store_xa=need_xa)
    if not save_xa:
        xa = xa.new_empty((0,))
    return y, xa


def _cublas_products(x, weight, bias, lora_B, xs):
    """y = x W0^T + bias + xs B^T by cuBLAS: bias + xs B^T first, then x W0^T added in place (beta = 1: the
    low-rank term is read in the GEMM's epilogue, not in an extra pass over y)."""
    lora_b_t = lora_B.t().to(xs.dtype)  # fp32 master adapters: rounded to x's type, as the kernels do
    y = torch.addmm(bias, xs, lora_b_t) if bias is not None else torch.mm(xs, lora_b_t)
    return y.addmm_(x, weight.t())


def _launch_gemm(x, weight, bias, lora_A, lora_B, xa, y, scaling, fuse_xa, store_xa, sorted_rows=None):
    """sorted_rows: None, or (order int32 [M], adapter_ids int32 [M], rank starts int32 [n + 1]) for the sorted
    mixed-batch variant (not fuse_xa)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if not fuse_xa and lora_B.dtype != x.dtype:
        # fp32 master adapters: the extra K steps over r stream B through the software pipeline, and fp32 tiles there
        # would double its shared memory (245 KB for the 128 x 256 tile, over sm_90's 227 KB); B [N, r] is cast here
        lora_B = lora_B.to(x.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    lora_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, lora_A, lora_B, xa, y,
        *(sorted_rows if sorted_rows is not None else (x, x, x)),
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), bias.stride(0) if bias is not None else 0,
        xa.stride(0) if store_xa else 0, y.stride(0), y.stride(1),
        float(scaling), m_bucket(M),
        HAS_BIAS=bias is not None, FUSE_XA=fuse_xa, STORE_XA=store_xa, SORTED=sorted_rows is not None,
        # the rank tile only exists when xa is fused; otherwise the rank is streamed in BLOCK_K steps and every
        # tile config is eligible (the small-M ones included)
        BLOCK_R=block_r(R) if fuse_xa else 16, DOT_PRECISION=dot_precision(x.dtype), UPCAST=INTERPRET,
    )


_RANK_STARTS: dict = {}


def rank_starts(rank_owner, n: int):
    """int32 [n + 1]: the first stacked rank of each adapter (and R), for rank_owner grouped in ascending adapter
    order as stack_adapters builds it; checked once per rank_owner tensor (a host sync), then cached."""
    hit = _RANK_STARTS.get(id(rank_owner))
    if hit is not None and hit[0]() is rank_owner and hit[1] == (rank_owner._version, n):
        return hit[2]
    if rank_owner.numel() > 1 and not bool((rank_owner[1:] >= rank_owner[:-1]).all()):
        raise ValueError("rank_owner: the sorted mixed-batch variant needs each adapter's ranks together, in "
                         "ascending adapter order (as stack_adapters builds them)")
    starts = torch.searchsorted(rank_owner, torch.arange(n + 1, device=rank_owner.device,
                                                         dtype=rank_owner.dtype)).to(torch.int32)
    if len(_RANK_STARTS) >= 256:
        _RANK_STARTS.clear()
    _RANK_STARTS[id(rank_owner)] = (weakref.ref(rank_owner), (rank_owner._version, n), starts)
    return starts


def lora_mixed_forward(x, weight, bias, lora_A, lora_B, seed, any_dropout: bool, gating, save: bool, variant: str,
                       xa_splits: int = 0):
    """Mixed batch on 2-D x: every row with its own adapter (see reference.lora_mixed_forward; lora_A/lora_B are
    the adapters concatenated along the rank, `gating` as in launch_xa). Returns (y, xs fp32 [M, R] or empty),
    xs = the gated, scaled dropout(x) A^T. Variants: ``gated`` (the thin kernel applies each row's gate, then
    Triton's GEMM adds xs B^T over the concatenated rank like a single adapter's), ``gated_cublas`` (the same with
    cuBLAS's GEMMs), ``sorted`` (no dropout: rows taken in adapter order in both kernels, each tile computing only
    the ranks of its own adapters; Triton's GEMM)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_A.shape[0]
    if variant not in ("gated", "gated_cublas", "sorted"):
        raise ValueError(f"variant: expected 'gated', 'gated_cublas' or 'sorted', got {variant!r}")
    xa = empty((M, R), x.device, torch.float32)
    if M == 0:
        return empty((M, N), x.device, x.dtype), (xa if save else xa.new_empty((0,)))
    if variant == "sorted":
        if any_dropout:
            raise ValueError("the sorted mixed-batch variant runs without dropout (its mask follows row positions)")
        ids, owner = gating[0], gating[1]
        order = torch.argsort(ids, stable=True).to(torch.int32)
        starts = rank_starts(owner, gating[2].numel())
        y = empty((M, N), x.device, x.dtype)
        launch_xa(x, lora_A, xa, None, seed, 1.0, 0.0, gating, False, sort=(order, starts), split_target=xa_splits)
        _launch_gemm(x, weight, bias, lora_A, lora_B, xa, y, 1.0, fuse_xa=False, store_xa=True,
                     sorted_rows=(order, ids, starts))
        return y, (xa if save else xa.new_empty((0,)))
    if variant == "gated_cublas":
        xs = empty((M, R), x.device, x.dtype)
        launch_xa(x, lora_A, xa, xs, seed, 1.0, 0.0, gating, any_dropout)
        y = _cublas_products(x, weight, bias, lora_B, xs)
    else:
        y = empty((M, N), x.device, x.dtype)
        launch_xa(x, lora_A, xa, None, seed, 1.0, 0.0, gating, any_dropout, split_target=xa_splits)
        _launch_gemm(x, weight, bias, lora_A, lora_B, xa, y, 1.0, fuse_xa=False, store_xa=True)
    return y, (xa if save else xa.new_empty((0,)))
