"""In-kernel dropout mask: Philox4x32-10 on (seed, element index), regenerated wherever it is needed.

The mask of element (m, k) of x [M, K] is a pure function of (seed, m, k), so forward and backward
(and the torch reference, and the CUDA kernels) agree without ever storing an M x K mask. One Philox
call yields four 32-bit words, which serve four consecutive columns: counter ``m * ceil(K/4) + k // 4``,
word ``k % 4``. The bit-exact PyTorch twin is ``lora_kernels.reference.dropout_keep_mask``.
"""

import torch
import triton
import triton.language as tl

from .configs import INTERPRET
from .numerics import rounded


@triton.jit
def _philox4x32(c0, c1, k0, k1, ROUNDS: tl.constexpr):
    # c2 = c3 = 0 at entry; the four words come back as uint32 tensors.
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(ROUNDS):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def dropout_keep(seed_ptr, row_start, col_start, K, threshold,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Keep-mask [BLOCK_M, BLOCK_K] for rows row_start.., columns col_start.. (col_start % 4 == 0)."""
    seed = tl.load(seed_ptr).to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    k4 = (K + 3) // 4
    rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
    quads = col_start // 4 + tl.arange(0, BLOCK_K // 4)
    counter = rows[:, None] * k4 + quads[None, :]
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    w0, w1, w2, w3 = _philox4x32(c0, c1, k0, k1, 10)
    # Columns 4j..4j+3 take words 0..3 of counter j.
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    return (words >> 1).to(tl.int32) >= threshold


@triton.jit
def dropout_mask_kernel(SEED, OUT, M, K, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[M, K] (int8) = the keep-mask, for the paths that apply it outside a Triton kernel."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    keep = dropout_keep(SEED, pid_m * BLOCK_M, pid_k * BLOCK_K, K, threshold, BLOCK_M, BLOCK_K)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(OUT + rows.to(tl.int64)[:, None] * K + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < M) & (cols[None, :] < K))


@triton.jit
def dropout_apply_kernel(SEED, X, OUT, M, K, stride_xm, stride_om, threshold, keep_scale,
                         UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[M, K] = X * keep / (1 - p) in X's dtype (OUT may be X: each element is read, then written, by one
    program). The scaling is applied in fp32 and rounded once."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    keep = dropout_keep(SEED, pid_m * BLOCK_M, pid_k * BLOCK_K, K, threshold, BLOCK_M, BLOCK_K)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=ok, other=0.0)
    out = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0)
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :], rounded(out, OUT.dtype.element_ty, UPCAST), mask=ok)


MASK_BLOCK = (32, 32) if INTERPRET else (32, 128)


def dropout_apply(x: torch.Tensor, seed: torch.Tensor, p: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverted dropout of a 2-D x with the package's mask for `seed`: x * keep / (1 - p), one read and one write
    (what torch's dropout costs, without keeping a mask). `out` may be x itself."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    M, K = x.shape
    bm, bk = MASK_BLOCK
    threshold, keep_scale = dropout_args(p)
    if M and K:
        dropout_apply_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
            seed, x, out, M, K, x.stride(0), out.stride(0), threshold, keep_scale, UPCAST=INTERPRET, BLOCK_M=bm,
            BLOCK_K=bk, num_warps=4)
    return out


def dropout_mask(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """The [M, K] keep-mask of the seed (bool), bit for bit reference.dropout_keep_mask."""
    out = torch.empty((M, K), dtype=torch.int8, device=seed.device)
    bm, bk = MASK_BLOCK
    if M and K:
        dropout_mask_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
            seed, out, M, K, dropout_args(p)[0], BLOCK_M=bm, BLOCK_K=bk, num_warps=4)
    return out.bool()


def dropout_args(p: float) -> tuple[int, float]:
    """Host-side kernel arguments (threshold on 31-bit words, 1 / (1 - p)) for dropout probability p."""
    from ..reference import dropout_threshold

    return dropout_threshold(p), 1.0 / (1.0 - p)
