"""Pure-PyTorch LoRA formulas: the ``torch`` backend and the oracle every other backend is tested against.

Everything here is written in plain tensor ops, in the dtype of the inputs, the way an eager
PEFT-style layer computes it. Run it on fp64 copies of the inputs and it is the reference the
kernels are measured against.

Dropout masks follow the package's counter-based scheme (docs/design.md, "Dropout"): the mask of
element (m, k) of x [M, K] is a pure function of (seed, m, k), computed with Philox4x32-10. This file
holds the bit-exact PyTorch version of that function, so the reference, the Triton kernels and the
CUDA kernels draw the same mask for the same seed.
"""

from __future__ import annotations

import torch

__all__ = [
    "philox4x32",
    "dropout_keep_mask",
    "dropout_threshold",
    "lora_forward",
    "lora_backward",
    "lora_mixed_forward",
    "lora_mixed_backward",
    "dora_weight_norm",
    "dora_forward",
    "dora_backward",
    "dequantize",
    "expert_bounds",
    "experts_forward",
    "experts_backward",
]

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32 (Salmon et al., 2011) on int64 tensors holding 32-bit words; key (k0, k1).

    Returns the four output words as int64 tensors with values in [0, 2**32). Identical, bit for bit,
    to the Triton kernels' ``_philox4x32``.

    Each round multiplies c2 and c0 by the round constants and xors c1 and c3 in; the two halves of the state
    travel as one [2, ...] tensor each (half the tensor ops). A 32 x 32-bit product is formed from the constant's
    16-bit halves, so no intermediate exceeds 2**49 (signed int64 overflow is never relied on).
    """
    device = next((c.device for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)), None)
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, device=device).to(torch.int64) & _M32
                                               for c in (c0, c1, c2, c3)))
    view = (2,) + (1,) * c0.dim()

    def pair(a: int, b: int) -> torch.Tensor:
        return torch.tensor([a, b], dtype=torch.int64, device=c0.device).view(view)

    const = pair(PHILOX_ROUND_B, PHILOX_ROUND_A)  # multiplies (c2, c0)
    const_hi, const_lo = const >> 16, const & _M16
    key, key_step = pair(k0 & _M32, k1 & _M32), pair(PHILOX_KEY_A, PHILOX_KEY_B)
    mul = torch.stack((c2, c0))    # the words multiplied this round
    other = torch.stack((c1, c3))  # the words xored into the products' high halves
    for _ in range(rounds):
        p_hi = mul * const_hi                   # < 2**48
        t = mul.mul_(const_lo)                  # < 2**48
        t += (p_hi & _M16) << 16                # low 48 bits of the product (and the carry out of bit 47)
        hi = (p_hi >> 16).add_(t >> 32)         # (hi_b, hi_a): high words of c2 * B, c0 * A
        lo = t.bitwise_and_(_M32)               # (lo_b, lo_a)
        hi ^= other
        hi ^= key                               # (c0', c2') = (hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1)
        mul, other = hi.flip(0), lo             # next round multiplies (c2', c0'); (c1', c3') = (lo_b, lo_a)
        key = (key + key_step) & _M32
    return mul[1], other[0], mul[0], other[1]


def dropout_threshold(p: float) -> int:
    """An element is kept when its 31-bit random integer is >= this threshold (P(keep) = 1 - p)."""
    return int(p * 2**31)


def dropout_keep_mask(seed: int, m: int, k: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask [m, k] of the package's dropout scheme.

    Element (i, j) uses the 64-bit Philox counter ``c = i * ceil(k / 4) + j // 4`` as (c0, c1) = (low,
    high word of c), c2 = c3 = 0, key (low, high word of the seed), and output word ``j % 4``; it is kept iff
    ``word >> 1 >= floor(p * 2**31)``.
    """
    k4 = (k + 3) // 4
    seed = int(seed)
    keep = torch.empty((m, k), dtype=torch.bool, device=device)
    threshold = dropout_threshold(p)
    cols = torch.arange(k4, device=device, dtype=torch.int64)[None, :]
    # On a CPU, blocks of rows with about 2**16 counters each: the ~120 passes of the rounds then run over data in
    # cache (several times faster than one pass over a large mask); on a GPU one block (each pass is a kernel
    # launch). The bits are the same either way.
    on_gpu = device is not None and torch.device(device).type == "cuda"
    step = max(1, m) if on_gpu else max(1, (1 << 16) // max(k4, 1))
    for r0 in range(0, m, step):
        rows = torch.arange(r0, min(m, r0 + step), device=device, dtype=torch.int64)[:, None]
        counter = rows * k4 + cols
        words = philox4x32(counter & _M32, counter >> 32, 0, 0, seed & _M32, (seed >> 32) & _M32)
        bits = torch.stack(words, dim=-1).reshape(rows.shape[0], 4 * k4)[:, :k]
        keep[r0:r0 + rows.shape[0]] = (bits >> 1) >= threshold
    return keep


def _dropped(x: torch.Tensor, seed: int | None, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverted dropout of a 2-D x with the package's mask; returns (x * D, D) (D None when p == 0)."""
    if p == 0.0:
        return x, None
    keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device)
    d = keep.to(x.dtype) * (1.0 / (1.0 - p))
    return x * d, d


def lora_forward(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float = 0.0, seed: int | None = None):
    """y = x W0^T + bias + scaling * (dropout(x) A^T) B^T for a 2-D x; returns (y, xa) with xa = dropout(x) A^T."""
    xd, _ = _dropped(x, seed, dropout_p)
    xa = xd @ lora_A.t()
    y = torch.nn.functional.linear(x, weight, bias) + (xa @ lora_B.t()) * scaling
    return y, xa


def lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling: float, dropout_p: float = 0.0,
                  seed: int | None = None, need_dx: bool = True):
    """Gradients (dx or None, dA, dB) of lora_forward for a 2-D x, from the saved xa."""
    xd, d = _dropped(x, seed, dropout_p)
    g = (grad_y @ lora_B) * scaling                     # [M, r]
    grad_B = (grad_y.t() @ xa.to(grad_y.dtype)) * scaling  # [N, r]
    grad_A = g.t() @ xd                                 # [r, K]
    grad_x = None
    if need_dx:
        gl = g @ lora_A
        grad_x = grad_y @ weight + (gl if d is None else gl * d)
    return grad_x, grad_A, grad_B


# --------------------------------------------------------------------------------------------
# Mixed batches: several adapters on one base, one adapter index per row.
# --------------------------------------------------------------------------------------------
def _adapter_parts(adapter_ids, rank_owner, scalings, dropout_ps):
    """(row indices, rank indices, scaling, dropout p) of each adapter that has rows and ranks."""
    for i, (s, p) in enumerate(zip(scalings, dropout_ps)):
        rows = (adapter_ids == i).nonzero().flatten()
        cols = (rank_owner == i).nonzero().flatten()
        if len(rows) and len(cols):
            yield rows, cols, s, p


def lora_mixed_forward(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps,
                       seed: int | None = None):
    """y[m] = x[m] W0^T + bias + s_i (dropout_i(x)[m] A_i^T) B_i^T with i = adapter_ids[m] (-1: base only).

    lora_A [R, K] and lora_B [N, R] hold the adapters' A and B concatenated along the rank; rank_owner [R]
    says which adapter each rank column belongs to; scalings[i], dropout_ps[i] are adapter i's. Adapter i's
    dropout mask is the single-adapter mask of probability dropout_ps[i] (same seed, same (row, column)
    counters). Returns (y, xs) with xs [M, R] = s_i * dropout_i(x) A_i^T on row m's own ranks, 0 elsewhere.
    Written adapter by adapter, independently of the gated kernels it checks.
    """
    y = torch.nn.functional.linear(x, weight, bias)
    xs = x.new_zeros((x.shape[0], lora_A.shape[0]))
    for rows, cols, s, p in _adapter_parts(adapter_ids, rank_owner, scalings, dropout_ps):
        xd, _ = _dropped(x, seed, p)
        xa = (xd[rows] @ lora_A[cols].t()) * s
        xs[rows[:, None], cols[None, :]] = xa
        y[rows] = y[rows] + xa @ lora_B[:, cols].t()
    return y, xs


def lora_mixed_backward(grad_y, x, weight, lora_A, lora_B, xs, adapter_ids, rank_owner, scalings, dropout_ps,
                        seed: int | None = None, need_dx: bool = True):
    """Gradients (dx or None, dA [R, K], dB [N, R]) of lora_mixed_forward, from its xs."""
    grad_A = torch.zeros_like(lora_A)
    grad_B = grad_y.t() @ xs.to(grad_y.dtype)  # xs is zero off each row's own ranks
    grad_x = grad_y @ weight if need_dx else None
    for rows, cols, s, p in _adapter_parts(adapter_ids, rank_owner, scalings, dropout_ps):
        xd, d = _dropped(x, seed, p)
        g = (grad_y[rows] @ lora_B[:, cols]) * s
        grad_A[cols] = g.t() @ xd[rows]
        if need_dx:
            gl = g @ lora_A[cols]
            grad_x[rows] = grad_x[rows] + (gl if d is None else gl * d[rows])
    return grad_x, grad_A, grad_B


# --------------------------------------------------------------------------------------------
# DoRA (Liu et al., 2024), with PEFT's semantics: y = m / ||W0 + s B A||_row * (W0 + s B A) x, the norm a constant in
# the backward (the paper's section 4.3); with dropout, the magnitude scales the base product of dropout(x).
# --------------------------------------------------------------------------------------------
def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dora_weight_norm(weight, lora_A, lora_B, scaling: float, w0_sq=None, rows_per_chunk: int | None = None):
    """||W0_n + s (B A)_n|| for every output row n (fp32; fp64 for fp64 weights), without forming B A:
    ||W0_n||^2 + 2 s sum_j B_nj (W0 A^T)_nj + s^2 sum_jk B_nj (A A^T)_jk B_nk, the adapters as stored (fp32 masters
    stay fp32, as PEFT computes B A). w0_sq: the rows' ||W0_n||^2 if known (W0 is frozen: kept by the layer).
    W0 is read in row chunks converted to the accumulation dtype, so no [N, K] tensor besides W0 itself exists."""
    acc = _acc(weight.dtype)
    N, K = weight.shape
    a, b = lora_A.to(acc), lora_B.to(acc)
    chunk = rows_per_chunk or max(1, min((N + 1) // 2, (1 << 20) // max(K, 1)))  # at most half of W0 at a time
    wa = torch.empty((N, a.shape[0]), dtype=acc, device=weight.device)
    sq = None if w0_sq is not None else torch.empty((N,), dtype=acc, device=weight.device)
    for r0 in range(0, N, chunk):
        w = weight[r0:r0 + chunk].to(acc)
        torch.mm(w, a.t(), out=wa[r0:r0 + chunk])
        if sq is not None:
            sq[r0:r0 + chunk] = (w * w).sum(1)
    w0_sq = sq if sq is not None else w0_sq.to(acc)
    cross = (wa * b).sum(1)
    quad = ((b @ (a @ a.t())) * b).sum(1)
    return (w0_sq + (2.0 * scaling) * cross + (scaling * scaling) * quad).clamp_min(0.0).sqrt()


def dora_forward(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling: float, dropout_p: float = 0.0,
                 seed: int | None = None):
    """DoRA's forward for a 2-D x, given the row norms (detached). Returns (y, xa, product) with xa = dropout(x) A^T
    and product the [M, N] term the magnitude's grad needs: without dropout P = x W0^T + s xa B^T, with dropout
    Q = dropout(x) W0^T + s xa B^T. y = g * P + bias, or x W0^T + bias + (g - 1) * dropout(x) W0^T + g * s xa B^T,
    with g = magnitude / norm (kept in fp32, as PEFT does; y rounded once)."""
    acc = _acc(x.dtype)
    g = magnitude.to(acc) / norm.to(acc)
    xd, _ = _dropped(x, seed, dropout_p)
    xa = xd @ lora_A.t()
    product = xd @ weight.t() + (xa @ lora_B.t()) * scaling
    y = product.to(acc) * g
    if dropout_p > 0.0:
        y = y + ((x - xd) @ weight.t()).to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype), xa, product


def dora_backward(grad_y, x, weight, lora_A, lora_B, magnitude, norm, xa, product, scaling: float,
                  dropout_p: float = 0.0, seed: int | None = None, need_dx: bool = True):
    """Grads (dx or None, dA, dB, d magnitude) of dora_forward for a 2-D x, from its xa and product; the norm is a
    constant. The LoRA part is LoRA's backward with dY scaled by g per column."""
    acc = _acc(x.dtype)
    g = magnitude.to(acc) / norm.to(acc)
    grad_m = (grad_y.to(acc) * product.to(acc)).sum(0) / norm.to(acc)
    gy = (grad_y.to(acc) * g).to(x.dtype)
    xd, d = _dropped(x, seed, dropout_p)
    gb = (gy @ lora_B) * scaling
    grad_B = (gy.t() @ xa.to(gy.dtype)) * scaling
    grad_A = gb.t() @ xd
    grad_x = None
    if need_dx:
        low = gb @ lora_A
        if d is None:
            grad_x = gy @ weight + low
        else:  # x W0^T + (g - 1) xd W0^T: dY W0 + D ((dY (g - 1)) W0 + G A)
            grad_x = grad_y @ weight + (((grad_y.to(acc) * (g - 1)).to(x.dtype)) @ weight + low) * d
    return grad_x, grad_A, grad_B, grad_m.to(magnitude.dtype)


# --------------------------------------------------------------------------------------------
# Quantized base weights (bitsandbytes' formats), dequantized: what QLoRA's base product multiplies by.
# --------------------------------------------------------------------------------------------
def dequantize(qw, dtype, rows=None):
    """W0 [N, K] (or its `rows` slice) in `dtype` from a quantized weight (lora_kernels.quantized.QuantizedWeight), as
    bitsandbytes defines its formats: fmt "nf4" / "fp4": two 4-bit codes per byte of the row-major flattened W0
    (element f in byte f // 2, the high nibble for even f), worth code[nibble] * absmax[f // blocksize], where a
    double-quantized absmax (uint8) is code2[absmax] * absmax2[block // blocksize2] + offset; fmt "int8": data [N, K]
    int8, each value data[n, k] * absmax[n] (absmax: the row's scale, its absolute maximum / 127). Values in fp32,
    rounded once to `dtype`."""
    N, K = qw.shape
    r0, r1 = (0, N) if rows is None else (rows.start, rows.stop)
    if qw.fmt == "int8":
        return (qw.data[r0:r1].float() * qw.absmax[r0:r1, None]).to(dtype)
    flat = torch.arange(r0 * K, r1 * K, device=qw.data.device, dtype=torch.int64)
    byte = qw.data.reshape(-1).view(torch.uint8)[flat // 2].to(torch.int64)
    nibble = torch.where(flat % 2 == 0, byte >> 4, byte & 0xF)
    block = flat // qw.blocksize
    if qw.absmax2.numel():
        scale = qw.code2[qw.absmax.view(torch.uint8)[block].long()] * qw.absmax2[block // qw.blocksize2] + qw.offset
    else:
        scale = qw.absmax[block]
    return (qw.code[nibble] * scale).reshape(r1 - r0, K).to(dtype)


# --------------------------------------------------------------------------------------------
# LoRA on Mixture-of-Experts experts: slots (token, expert pairs) sorted by expert.
# --------------------------------------------------------------------------------------------
def expert_bounds(offsets: torch.Tensor) -> list[int]:
    """[0, end of expert 0, end of expert 1, ...] from the inclusive offsets (one host read)."""
    return [0] + [int(v) for v in offsets.tolist()]


def _expert_weight(weight, e: int, transposed: bool):
    """Expert e's W0 as [K, N] (weight [E, N, K], or [E, K, N] when transposed)."""
    return weight[e] if transposed else weight[e].t()


def experts_forward(x, weight, bias, lora_A, lora_B, offsets, gather, scaling: float, dropout_p: float = 0.0,
                    seed: int | None = None, transposed: bool = False):
    """Slot s of expert e (rows offsets[e-1] .. offsets[e] of the sorted slots; slot s reads token gather[s], or row
    s of x without a gather): y_s = x W0_e^T + b_e + scaling * (dropout(x) A_e^T) B_e^T, expert by expert. The
    dropout mask is the package's over the [S, K] slot rows. Returns (y [S, N], xa [S, r])."""
    xs = x if gather is None else x[gather]
    xd, _ = _dropped(xs, seed, dropout_p)
    S, N, r = xs.shape[0], lora_B.shape[1], lora_A.shape[1]
    y, xa = xs.new_zeros((S, N)), xs.new_zeros((S, r))
    bounds = expert_bounds(offsets)
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        xa[lo:hi] = xd[lo:hi] @ lora_A[e].t()
        ye = xs[lo:hi] @ _expert_weight(weight, e, transposed) + (xa[lo:hi] @ lora_B[e].t()) * scaling
        y[lo:hi] = ye if bias is None else ye + bias[e]
    return y, xa


def experts_backward(grad_y, x, weight, lora_A, lora_B, xa, offsets, gather, scaling: float, dropout_p: float = 0.0,
                     seed: int | None = None, transposed: bool = False, need_dx: bool = True):
    """Grads (dx [T, K] or None, dA [E, r, K], dB [E, N, r]) of experts_forward from the saved xa; dx sums the
    slots of each token (the gather's adjoint)."""
    xs = x if gather is None else x[gather]
    xd, d = _dropped(xs, seed, dropout_p)
    grad_A, grad_B = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    dxs = torch.zeros_like(xs) if need_dx else None
    bounds = expert_bounds(offsets)
    for e in range(len(bounds) - 1):
        lo, hi = bounds[e], bounds[e + 1]
        dy = grad_y[lo:hi]
        g = (dy @ lora_B[e]) * scaling
        grad_A[e] = g.t() @ xd[lo:hi]
        grad_B[e] = (dy.t() @ xa[lo:hi].to(dy.dtype)) * scaling
        if need_dx:
            gl = g @ lora_A[e]
            dxs[lo:hi] = dy @ _expert_weight(weight, e, transposed).t() + (gl if d is None else gl * d[lo:hi])
    grad_x = None
    if need_dx:
        grad_x = dxs if gather is None else torch.zeros_like(x).index_add_(0, gather, dxs)
    return grad_x, grad_A, grad_B
