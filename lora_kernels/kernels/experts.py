"""LoRA on Mixture-of-Experts experts in Triton: grouped GEMMs over slots sorted by expert, the low-rank term fused.

Slots (token, expert pairs) are sorted by expert; ``offsets`` [E] holds each expert's end (the inclusive cumsum of
its slot counts, as transformers computes it). A tile schedule (``tile_schedule``: per row tile its expert and first
slot, computed on the device, no host read) lets one launch cover every expert: programs past the last tile exit.

* ``experts_shrink_kernel``: out [S, r] (fp32) = scale * (dropout(in_{g(s)}) L_e^T) — xa = dropout(x) A_e^T in the
  forward (x gathered by the slot -> token index, the mask drawn per slot), G = s * dY B_e in the backward.
* ``experts_gemm_kernel``: out [S, n] = in_{g(s)} W_e + scale * (lo_s L_e) [* the dropout mask] + bias_e — the
  forward (x W0_e^T + s xa B_e^T + b_e) and the backward's dX (dY W0_e + (G A_e) * D); W_e is read through strides,
  so W0 [E, N, K] and the transposed [E, K, N] (gpt-oss) are both taken as stored.
* ``experts_lowrank_grad_kernel``: out_e [r, c] = scale * sum over the expert's slots of lo_s^T dropout(in_{g(s)}) —
  dA_e = G_e^T dropout(x_e) and dB_e^T = s xa_e^T dY_e, one program per (expert, column tile) looping over the
  expert's rows: no atomics, the same bits every run.

Nothing [E, N, K]-sized is formed; the backward reads x (and the gather), xa, offsets and the seed.
"""

import torch
import triton
import triton.language as tl

from ..experts import expert_features
from ..grouped import scatter_rows
from .configs import INTERPRET, dot_precision
from .dropout import dropout_args, dropout_keep
from .memory import empty
from .numerics import as_type, rounded


@triton.jit
def _tile(TILE_EXPERT, TILE_START, OFFSETS, pid):
    """(expert, first slot, end of the expert's slots) of row tile `pid`; expert -1: no tile there."""
    e = tl.load(TILE_EXPERT + pid)
    start = tl.load(TILE_START + pid)
    end = tl.load(OFFSETS + tl.maximum(e, 0))
    return e, start, end


@triton.jit
def _slot_rows(GATHER, first, end, BLOCK_M: tl.constexpr, HAS_GATHER: tl.constexpr):
    """(slot offsets, which are the expert's, the slots clamped in bounds, their rows of the input): BLOCK_M slots
    from `first`; slots at or past `end` read the first one (their results are masked out)."""
    offs = first + tl.arange(0, BLOCK_M)
    ok = offs < end
    slots = tl.where(ok, offs, first)
    if HAS_GATHER:
        rows = tl.load(GATHER + slots).to(tl.int64)
    else:
        rows = slots.to(tl.int64)
    return offs, ok, slots, rows


@triton.jit
def experts_shrink_kernel(
    IN, GATHER, L, SEED, OUT, TILE_EXPERT, TILE_START, OFFSETS,
    K, R,
    stride_im, stride_ik, stride_le, stride_lj, stride_lk, stride_om,
    scale, threshold, keep_scale,
    HAS_GATHER: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e, start, end = _tile(TILE_EXPERT, TILE_START, OFFSETS, tl.program_id(0))
    if e >= 0:
        offs_m, row_ok, slots, rows = _slot_rows(GATHER, start, end, BLOCK_M, HAS_GATHER)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        in_ptrs = IN + rows[:, None] * stride_im + offs_k[None, :] * stride_ik
        l_ptrs = L + e.to(tl.int64) * stride_le + offs_r[None, :] * stride_lj + offs_k[:, None] * stride_lk
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(in_ptrs, mask=k_ok[None, :], other=0.0)
            if DROPOUT:
                keep = dropout_keep(SEED, start, k0, K, threshold, BLOCK_M, BLOCK_K)
                a = as_type(tl.where(keep, a.to(tl.float32) * keep_scale, 0.0), IN.dtype.element_ty, UPCAST)
            elif UPCAST:
                a = a.to(tl.float32)
            # fp32 master adapters next to 16-bit inputs are rounded to the inputs' type, as a cast would
            lt = as_type(tl.load(l_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0), IN.dtype.element_ty, UPCAST)
            acc = tl.dot(a, lt, acc, input_precision=DOT_PRECISION)
            in_ptrs += BLOCK_K * stride_ik
            l_ptrs += BLOCK_K * stride_lk
        tl.store(OUT + offs_m.to(tl.int64)[:, None] * stride_om + offs_r[None, :], acc * scale,
                 mask=row_ok[:, None] & r_ok[None, :])


@triton.jit
def experts_gemm_kernel(
    IN, GATHER, W, LO, L, BIAS, SEED, OUT, TILE_EXPERT, TILE_START, OFFSETS,
    N, K, R,
    stride_im, stride_ik, stride_we, stride_wk, stride_wn, stride_lom, stride_le, stride_lj, stride_ln,
    stride_be, stride_bn, stride_om,
    scale, threshold, keep_scale,
    HAS_GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e, start, end = _tile(TILE_EXPERT, TILE_START, OFFSETS, tl.program_id(0))
    if e >= 0:
        pid_n = tl.program_id(1)
        offs_m, row_ok, slots, rows = _slot_rows(GATHER, start, end, BLOCK_M, HAS_GATHER)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = offs_n % N  # out-of-range columns wrap around: loads stay in bounds, stores are masked
        offs_k = tl.arange(0, BLOCK_K)
        e64 = e.to(tl.int64)
        in_ptrs = IN + rows[:, None] * stride_im + offs_k[None, :] * stride_ik
        w_ptrs = W + e64 * stride_we + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(in_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            in_ptrs += BLOCK_K * stride_ik
            w_ptrs += BLOCK_K * stride_wk
        # the low-rank term: (scale * lo) [BM, r] in the output's type times L_e [r, BN]
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R
        lo = tl.load(LO + slots.to(tl.int64)[:, None] * stride_lom + offs_r[None, :], mask=r_ok[None, :], other=0.0)
        lo = as_type(lo * scale, OUT.dtype.element_ty, UPCAST)
        lw = as_type(tl.load(L + e64 * stride_le + offs_r[:, None] * stride_lj + cols[None, :] * stride_ln,
                             mask=r_ok[:, None], other=0.0), OUT.dtype.element_ty, UPCAST)
        if DROPOUT:  # the mask of the slot's input row applies to the low-rank term only (dX = dY W0 + (G A) * D)
            low = tl.dot(lo, lw, input_precision=DOT_PRECISION)
            keep = dropout_keep(SEED, start, pid_n * BLOCK_N, N, threshold, BLOCK_M, BLOCK_N)
            acc += tl.where(keep, low * keep_scale, 0.0)
        else:
            acc = tl.dot(lo, lw, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + e64 * stride_be + cols * stride_bn).to(tl.float32)[None, :]
        tl.store(OUT + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :],
                 rounded(acc, OUT.dtype.element_ty, UPCAST), mask=row_ok[:, None] & (offs_n[None, :] < N))


@triton.jit
def experts_lowrank_grad_kernel(
    LO, IN, GATHER, SEED, OUT, OFFSETS,
    C, R,
    stride_lom, stride_im, stride_ic, stride_oe, stride_oj, stride_oc,
    scale, threshold, keep_scale,
    HAS_GATHER: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out_e^T [BLOCK_C, r] = dropout(in_e)^T lo_e: the wide column tile is the dot's M (Hopper's wgmma wants 64 rows
    # per warpgroup), the rank its N, the expert's slots its K in BLOCK_S steps.
    e = tl.program_id(0)
    pid_c = tl.program_id(1)
    end = tl.load(OFFSETS + e)
    start = tl.load(OFFSETS + tl.maximum(e - 1, 0))
    start = tl.where(e > 0, start, 0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = offs_c % C
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        _, ok, slots, rows = _slot_rows(GATHER, s0, end, BLOCK_S, HAS_GATHER)
        lo = tl.load(LO + slots.to(tl.int64)[:, None] * stride_lom + offs_r[None, :], mask=ok[:, None] & r_ok[None, :],
                     other=0.0)
        lo = as_type(lo, IN.dtype.element_ty, UPCAST)
        a = tl.load(IN + rows[:, None] * stride_im + cols[None, :] * stride_ic, mask=ok[:, None], other=0.0)
        if DROPOUT:
            keep = dropout_keep(SEED, s0, pid_c * BLOCK_C, C, threshold, BLOCK_S, BLOCK_C)
            a = as_type(tl.where(keep, a.to(tl.float32) * keep_scale, 0.0), IN.dtype.element_ty, UPCAST)
        elif UPCAST:
            a = a.to(tl.float32)
        acc = tl.dot(tl.trans(a), lo, acc, input_precision=DOT_PRECISION)
    tl.store(OUT + e.to(tl.int64) * stride_oe + offs_c[:, None] * stride_oc + offs_r[None, :] * stride_oj,
             acc * scale, mask=(offs_c[:, None] < C) & r_ok[None, :])


# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) per GPU generation and element size; one fixed config per kernel
# (MoE shapes change every step with the routing: per-shape autotuning would time on the training's clock).
# "gemm": the grouped GEMM (forward and dX); "thin": the shrink (BLOCK_N unused) and the dA/dB reductions (BLOCK_N is
# the column tile).
TILES = {
    "gemm": {90: {2: (64, 128, 64, 4, 3), 4: (64, 64, 32, 4, 3)}, 80: {2: (64, 128, 32, 4, 3), 4: (64, 64, 32, 4, 3)}},
    "thin": {90: {2: (64, 64, 64, 4, 3), 4: (32, 64, 32, 4, 2)}, 80: {2: (64, 64, 32, 4, 3), 4: (32, 64, 32, 4, 2)}},
}
_INTERPRETER_TILE = (16, 32, 32, 4, 1)
MAX_RANK = 128  # the widest padded rank of the tiles above (the [BLOCK_M, r] accumulator of the shrink)


def tile(kind: str, dtype: torch.dtype) -> tuple:
    if INTERPRET or not torch.cuda.is_available():
        return _INTERPRETER_TILE
    major, _ = torch.cuda.get_device_capability()
    return TILES[kind][90 if major >= 9 else 80][torch.tensor([], dtype=dtype).element_size()]


def block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(max(r, 1)))


def tile_schedule(offsets: torch.Tensor, S: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(expert of each row tile or -1, its first slot, number of tiles launched) for slots sorted by expert, on the
    device (no host read): at most cdiv(S, BLOCK_M) + E tiles; programs past the last real one exit."""
    E = offsets.shape[0]
    ends = offsets.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    n = triton.cdiv(S, block_m) + E
    t = torch.arange(n, device=offsets.device)
    e = torch.searchsorted(tile_end, t, right=True)
    ec = e.clamp(max=E - 1)
    start = ends[ec] - counts[ec] + (t - (tile_end[ec] - tiles[ec])) * block_m
    return torch.where(e < E, ec, -1).to(torch.int32), start.to(torch.int32), n


def _schedule(offsets, S: int, block_m: int, schedules: dict | None):
    """tile_schedule, kept in `schedules` (one call's launches share it: the same offsets and slots) by BLOCK_M."""
    if schedules is None:
        return tile_schedule(offsets, S, block_m)
    if block_m not in schedules:
        schedules[block_m] = tile_schedule(offsets, S, block_m)
    return schedules[block_m]


def _dropout(p: float):
    return dropout_args(p) if p > 0.0 else (0, 1.0)


def shrink(inp, gather, lora, offsets, seed, p: float, scale: float, transpose_lora: bool = False,
           schedules: dict | None = None):
    """out [S, r] fp32 = scale * dropout(inp[gather]) L_e^T per slot; `lora` is [E, r, c] (A), or [E, c, r] with
    transpose_lora (B, read as its transpose). `schedules`: the call's tile schedules (``_schedule``)."""
    S = gather.shape[0] if gather is not None else inp.shape[0]
    C = inp.shape[1]
    r = lora.shape[2] if transpose_lora else lora.shape[1]
    bm, _, bk, warps, stages = tile("thin", inp.dtype)
    te, ts, n = _schedule(offsets, S, bm, schedules)
    out = empty((S, r), inp.device, torch.float32)
    stride_lj, stride_lk = (lora.stride(2), lora.stride(1)) if transpose_lora else (lora.stride(1), lora.stride(2))
    threshold, keep_scale = _dropout(p)
    if S and r:
        experts_shrink_kernel[(n,)](
            inp, gather if gather is not None else offsets, lora, seed if p > 0 else offsets, out, te, ts, offsets,
            C, r, inp.stride(0), inp.stride(1), lora.stride(0), stride_lj, stride_lk, out.stride(0),
            float(scale), threshold, keep_scale,
            HAS_GATHER=gather is not None, DROPOUT=p > 0.0, BLOCK_R=block_r(r), DOT_PRECISION=dot_precision(inp.dtype),
            UPCAST=INTERPRET, BLOCK_M=bm, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


def gemm(inp, gather, weight, w_strides, lo, lora, lora_strides, bias, offsets, seed, p: float, scale: float,
         n_out: int, schedules: dict | None = None):
    """out [S, n_out] = inp[gather] W_e + scale * (lo L_e) [* mask] + bias_e per slot. `w_strides` (expert, reduction,
    output) and `lora_strides` (expert, rank, output) read W_e and L_e in whatever layout they are stored."""
    S = gather.shape[0] if gather is not None else inp.shape[0]
    K, r = inp.shape[1], lo.shape[1]
    bm, bn, bk, warps, stages = tile("gemm", inp.dtype)
    te, ts, n = _schedule(offsets, S, bm, schedules)
    out = empty((S, n_out), inp.device, inp.dtype)
    threshold, keep_scale = _dropout(p)
    if S and n_out:
        experts_gemm_kernel[(n, triton.cdiv(n_out, bn))](
            inp, gather if gather is not None else offsets, weight, lo, lora, bias if bias is not None else lo,
            seed if p > 0 else offsets, out, te, ts, offsets,
            n_out, K, r, inp.stride(0), inp.stride(1), *w_strides, lo.stride(0), *lora_strides,
            bias.stride(0) if bias is not None else 0, bias.stride(1) if bias is not None else 0, out.stride(0),
            float(scale), threshold, keep_scale,
            HAS_GATHER=gather is not None, HAS_BIAS=bias is not None, DROPOUT=p > 0.0, BLOCK_R=block_r(r),
            DOT_PRECISION=dot_precision(inp.dtype), UPCAST=INTERPRET, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            num_warps=warps, num_stages=stages)
    return out


def lowrank_grad(lo, inp, gather, offsets, seed, p: float, scale: float, out_shape, out_strides_of):
    """fp32 out_e [r, c] = scale * lo_e^T dropout(inp[gather])_e per expert, stored through `out_strides_of(out)`
    (expert, rank, column) into a buffer of `out_shape`."""
    E, r, C = offsets.shape[0], lo.shape[1], inp.shape[1]
    bm, bc, _, warps, stages = tile("thin", inp.dtype)
    out = torch.zeros(out_shape, device=inp.device, dtype=torch.float32)
    threshold, keep_scale = _dropout(p)
    if E and r and C:
        experts_lowrank_grad_kernel[(E, triton.cdiv(C, bc))](
            lo, inp, gather if gather is not None else offsets, seed if p > 0 else offsets, out, offsets,
            C, r, lo.stride(0), inp.stride(0), inp.stride(1), *out_strides_of(out), float(scale), threshold,
            keep_scale, HAS_GATHER=gather is not None, DROPOUT=p > 0.0, BLOCK_R=block_r(r),
            DOT_PRECISION=dot_precision(inp.dtype), UPCAST=INTERPRET, BLOCK_S=bm, BLOCK_C=bc, num_warps=warps,
            num_stages=stages)
    return out


def experts_forward(x, weight, bias, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p, save_xa,
                    transposed):
    """(y [S, N], xa [S, r] fp32): xa = dropout(x_g) A_e^T (one launch), then y = x_g W0_e^T + b_e + s xa B_e^T
    (one launch)."""
    N = expert_features(weight, transposed)[1]
    schedules = {}
    xa = shrink(x, gather, lora_A, offsets, seed, dropout_p, 1.0, schedules=schedules)
    # W_e^T as [reduction K, output N]: weight [E, N, K] (strides e, n, k) or transposed [E, K, N]
    w_strides = ((weight.stride(0), weight.stride(1), weight.stride(2)) if transposed
                 else (weight.stride(0), weight.stride(2), weight.stride(1)))
    b_strides = (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1))  # B_e^T [r, N]
    y = gemm(x, gather, weight, w_strides, xa, lora_B, b_strides, bias, offsets, None, 0.0, scaling, N, schedules)
    return y, (xa if save_xa else x.new_empty((0,), dtype=torch.float32))


def experts_backward(grad_y, x, weight, lora_A, lora_B, xa, offsets, gather, seed, scaling, dropout_p, need_dx,
                     transposed):
    """(dx [T, K] or empty, dA [E, r, K], dB [E, N, r]) in the adapters' dtype: G = s dY B_e (one launch); dA, dB
    per expert (two launches, no atomics); dX per slot = dY W0_e + (G A_e) * D (one launch), summed per token."""
    E, r, K = lora_A.shape
    N = lora_B.shape[1]
    grad_y = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
    schedules = {}
    g = shrink(grad_y, None, lora_B, offsets, None, 0.0, scaling, transpose_lora=True, schedules=schedules)
    grad_A = lowrank_grad(g, x, gather, offsets, seed, dropout_p, 1.0, (E, r, K),
                          lambda o: (o.stride(0), o.stride(1), o.stride(2)))
    grad_B = lowrank_grad(xa, grad_y, None, offsets, None, 0.0, scaling, (E, N, r),
                          lambda o: (o.stride(0), o.stride(2), o.stride(1)))
    dx = x.new_empty((0,))
    if need_dx:
        # dY W0_e: W0_e as [reduction N, output K]
        w_strides = ((weight.stride(0), weight.stride(2), weight.stride(1)) if transposed
                     else (weight.stride(0), weight.stride(1), weight.stride(2)))
        dxs = gemm(grad_y, None, weight, w_strides, g, lora_A, (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2)),
                   None, offsets, seed, dropout_p, 1.0, K, schedules)
        dx = scatter_rows(dxs, gather, x.shape[0])
    return dx, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype)
