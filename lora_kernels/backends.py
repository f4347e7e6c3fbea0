"""The implementations of the op contract, one per variant, and which backend families can run here (and why not).

Which variant runs a call is the planner's decision (``lora_kernels.plan``); everything here runs what it is told.
Every single-adapter variant has the same signature on 2-D inputs (see ``lora_kernels.ops`` for the contract):

    FORWARD[v](x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa, xa_splits, aux) -> (y, xa)
    BACKWARD[v](grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic, aux)
        -> (dx or empty, dA, dB)

``aux`` (the plan's): whether the variant's auxiliary passes (aten's dropout mask) may run as Triton kernels; a
family forced by name (torch, aten) never launches another family's kernels.

and mixed batches ``MIXED_FORWARD`` / ``MIXED_BACKWARD`` likewise. ``seed`` is a one-element int64 tensor on the
inputs' device (None when dropout_p == 0); ``xa`` is the fp32 (fp64 for fp64 inputs) product dropout(x) A^T that
every forward saves the same way, so any backward can follow any forward.

Families: ``torch`` (the reference formulas), ``aten`` (every product by ATen, as PEFT's eager layer computes them,
with the package's dropout mask), ``triton`` (kernels/), ``cuda`` (csrc/).
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple

import torch

from . import reference
from .contract import ALL_DTYPES, KERNEL_DTYPES, like_x, seed_int


class BackendUnavailableError(RuntimeError):
    """The requested backend or plan cannot run these tensors here; the message says why."""


def _xa_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_like_none(x):
    return x.new_empty((0,))


# --------------------------------------------------------------------------------------------
# torch: the reference formulas, in the inputs' dtype.
# --------------------------------------------------------------------------------------------
class TorchBackend:
    name = "torch"

    @staticmethod
    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa, xa_splits=0, aux=False):
        y, xa = reference.lora_forward(x, weight, bias, *like_x(x, lora_A, lora_B), scaling, dropout_p,
                                       seed_int(seed))
        xa = xa.to(_xa_dtype(x.dtype)) if save_xa else x.new_empty((0,), dtype=_xa_dtype(x.dtype))
        return y, xa

    @staticmethod
    def backward(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic, aux=False):
        dx, da, db = reference.lora_backward(grad_y, x, weight, *like_x(x, lora_A, lora_B), xa, scaling, dropout_p,
                                             seed_int(seed), need_dx)
        return (dx if need_dx else _empty_like_none(x)), da.to(lora_A.dtype), db.to(lora_B.dtype)

    @staticmethod
    def mixed_forward(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps, seed, save,
                      xa_splits=0):
        y, xs = reference.lora_mixed_forward(x, weight, bias, *like_x(x, lora_A, lora_B), adapter_ids, rank_owner,
                                             scalings, dropout_ps, seed_int(seed))
        xs = xs.to(_xa_dtype(x.dtype)) if save else x.new_empty((0,), dtype=_xa_dtype(x.dtype))
        return y, xs

    @staticmethod
    def mixed_backward(grad_y, x, weight, lora_A, lora_B, xs, adapter_ids, rank_owner, scalings, dropout_ps, seed,
                       need_dx, deterministic):
        dx, da, db = reference.lora_mixed_backward(grad_y, x, weight, *like_x(x, lora_A, lora_B), xs, adapter_ids,
                                                   rank_owner, scalings, dropout_ps, seed_int(seed), need_dx)
        return (dx if need_dx else _empty_like_none(x)), da.to(lora_A.dtype), db.to(lora_B.dtype)


# --------------------------------------------------------------------------------------------
# aten: every product by ATen (cuBLAS on a GPU), as PEFT's eager layer computes them, with the package's mask.
# --------------------------------------------------------------------------------------------
def dropped(t, seed, p: float, in_place: bool = False, kernels: bool = False):
    """Inverted dropout of a 2-D t [M, K] with the package's mask (t * keep / (1 - p), in t's dtype). `kernels`: by
    the Triton kernel where it runs (the Triton and CUDA families' variants ask for it), else by the reference's
    bit-identical mask in plain PyTorch (the torch and aten families never launch another family's kernels).
    in_place: t is a temporary the result may overwrite."""
    if p == 0.0:
        return t
    if t.device.type == "meta":  # shapes only (bench.memory counts bytes on the meta device)
        return t if in_place else torch.empty_like(t)
    if kernels and triton_serves(t.device, t.dtype):
        from .kernels.dropout import dropout_apply

        return dropout_apply(t, seed, p, out=t if in_place and t.is_contiguous() else None)
    keep = reference.dropout_keep_mask(seed_int(seed), t.shape[0], t.shape[1], p, device=t.device)
    return torch.where(keep, t * (1.0 / (1.0 - p)), 0.0).to(t.dtype)


class AtenBackend:
    """y = bias + (s xa) B^T, then x W0^T added in place (beta = 1: read in the GEMM's epilogue); the backward's
    products likewise. The dropout mask is regenerated in the backward (applied to x for dA and to G A for dX), so
    no dropped copy of x is kept between forward and backward."""

    name = "aten"

    @staticmethod
    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa, xa_splits=0, aux=False):
        lora_A, lora_B = like_x(x, lora_A, lora_B)
        xa = torch.mm(dropped(x, seed, dropout_p, kernels=aux), lora_A.t())
        xs = xa * scaling
        lora_b_t = lora_B.t()
        y = torch.addmm(bias, xs, lora_b_t) if bias is not None else torch.mm(xs, lora_b_t)
        y.addmm_(x, weight.t())
        return y, (xa.to(_xa_dtype(x.dtype)) if save_xa else x.new_empty((0,), dtype=_xa_dtype(x.dtype)))

    @staticmethod
    def backward(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic, aux=False):
        a, b = like_x(x, lora_A, lora_B)
        g = torch.mm(grad_y, b).mul_(scaling)
        grad_A = torch.mm(g.t(), dropped(x, seed, dropout_p, kernels=aux))
        dx = _empty_like_none(x)
        if need_dx:
            dx = dropped(torch.mm(g, a), seed, dropout_p, in_place=True, kernels=aux).addmm_(grad_y, weight)
        grad_B = torch.mm(grad_y.t(), (xa * scaling).to(grad_y.dtype))
        return dx, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype)


# --------------------------------------------------------------------------------------------
# triton: the fused kernels of lora_kernels.kernels.
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    try:
        from . import kernels  # noqa: F401
    except Exception as e:
        return f"the Triton kernels failed to load ({type(e).__name__}: {e})"
    from . import plan

    plan.apply_autotune_setting()
    return None


def triton_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels run tensors of `dtype` on `device`: CUDA, or CPU under the interpreter. The passes
    that have a plain-PyTorch twin (the dropout mask, DoRA's norm and scale, QLoRA's dequantization) take the kernel
    only where the plan's ``aux`` asks for it (``plan.aux_kernels_for``) and this holds."""
    return (dtype in KERNEL_DTYPES and triton_import_error() is None
            and (device.type == "cuda" or (triton_interpreting() and device.type == "cpu")))


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 before triton was imported)."""
    if triton_import_error() is not None:
        return False
    from .kernels.configs import INTERPRET

    return INTERPRET


@functools.lru_cache(maxsize=64)
def _per_adapter_tensors(scalings: tuple, dropout_ps: tuple, device: torch.device):
    """(scalings fp32, dropout thresholds int32, 1 / (1 - p) fp32) on `device`, one entry per adapter."""
    from .kernels.dropout import dropout_args

    return (torch.tensor(scalings, dtype=torch.float32, device=device),
            torch.tensor([dropout_args(p)[0] for p in dropout_ps], dtype=torch.int32, device=device),
            torch.tensor([dropout_args(p)[1] for p in dropout_ps], dtype=torch.float32, device=device))


class TritonBackend:
    name = "triton"

    @staticmethod
    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
        err = triton_import_error()
        if err:
            return err
        if dtype not in KERNEL_DTYPES:
            return f"the Triton kernels support float16, bfloat16 and float32, not {dtype}"
        if triton_interpreting():
            if device.type != "cpu":
                return "TRITON_INTERPRET=1 is set: the Triton interpreter runs on CPU tensors only"
            return None
        if device.type != "cuda":
            return (f"Triton kernels need CUDA tensors (got {device.type}); on CPU they run only in the "
                    "interpreter (set TRITON_INTERPRET=1 before triton is imported)")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the Triton kernels need compute capability >= 8.0, the GPU has {major}.{minor}"
        return None

    @staticmethod
    def forward_as(variant):
        def forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa, xa_splits=0, aux=False):
            from .kernels.forward import lora_forward

            return lora_forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa, variant, xa_splits)
        return forward

    @staticmethod
    def backward_as(variant):
        def backward(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic,
                     aux=False):
            from .kernels.backward import lora_backward

            return lora_backward(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx,
                                 deterministic, variant)
        return backward

    @staticmethod
    def _gating(x, adapter_ids, rank_owner, scalings, dropout_ps):
        """The per-row / per-rank tensors the gated kernels read. The per-adapter values come from a small cache:
        building them from Python lists each call would be a host-to-device copy, which waits for the stream."""
        scales, thresholds, keep_scales = _per_adapter_tensors(tuple(scalings), tuple(dropout_ps), x.device)
        return (adapter_ids.to(torch.int32).contiguous(), rank_owner.to(torch.int32).contiguous(), scales,
                thresholds, keep_scales)

    @staticmethod
    def mixed_forward_as(variant):
        def mixed_forward(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps, seed, save,
                          xa_splits=0):
            from .kernels.forward import lora_mixed_forward

            gating = TritonBackend._gating(x, adapter_ids, rank_owner, scalings, dropout_ps)
            return lora_mixed_forward(x, weight, bias, lora_A, lora_B, seed, any(p > 0 for p in dropout_ps), gating,
                                      save, variant, xa_splits)
        return mixed_forward

    @staticmethod
    def mixed_backward(grad_y, x, weight, lora_A, lora_B, xs, adapter_ids, rank_owner, scalings, dropout_ps, seed,
                       need_dx, deterministic):
        from .kernels.backward import lora_mixed_backward

        gating = TritonBackend._gating(x, adapter_ids, rank_owner, scalings, dropout_ps)
        return lora_mixed_backward(grad_y, x, weight, lora_A, lora_B, xs, seed, any(p > 0 for p in dropout_ps),
                                   gating, need_dx, deterministic)


# --------------------------------------------------------------------------------------------
# cuda: the csrc extension.
# --------------------------------------------------------------------------------------------
class CudaBackend:
    """The csrc/ kernels: a tiled tensor-core forward (one launch), a cooperative one-pass decode forward for
    M <= 16, and a one-launch backward. Allocation and the grads' final casts happen here; the binding checks and
    launches."""

    name = "cuda"
    BWD_BLOCK_M = 64  # kBwdBlockM: one dA/dB partial per 64 rows in deterministic mode

    @staticmethod
    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return f"the CUDA C++ kernels need CUDA tensors (got {device.type})"
        if dtype not in KERNEL_DTYPES:
            return f"the CUDA C++ kernels support float16, bfloat16 and float32, not {dtype}"
        from . import cuda_ext

        reason = cuda_ext.load()
        if reason:
            return reason
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the CUDA C++ kernels need compute capability >= 8.0, the GPU has {major}.{minor}"
        return None

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa, xa_splits=0, aux=False, *,
                decode: bool):
        """decode: the one-pass decode kernel (M <= 16; the planner's cuda_decode) instead of the tiled one."""
        from .kernels.memory import empty  # NaN-filled when the tests poison outputs

        M, r = x.shape[0], lora_A.shape[0]
        lora_A, lora_B = like_x(x, lora_A, lora_B)  # the CUDA C++ kernels take one dtype
        x, weight, lora_A, lora_B = (t.contiguous() for t in (x, weight, lora_A, lora_B))
        bias = None if bias is None else bias.contiguous()
        y = empty((M, weight.shape[0]), x.device, x.dtype)
        if decode:  # xa, then the kernel's completion counter, in one buffer (one memset)
            buffer = empty((M * r + 1,), x.device, torch.float32)  # the kernel zeroes it
            xa = buffer[:M * r].view(M, r)
        else:
            buffer = xa = empty((M, r) if save_xa else (0,), x.device, torch.float32)
        if M:
            torch.ops.lora_kernels_cuda.forward(x, weight, bias, lora_A, lora_B, seed if dropout_p > 0 else None, y,
                                                buffer, float(scaling), float(dropout_p), bool(save_xa), decode)
        return y, (xa if save_xa else x.new_empty((0,), dtype=torch.float32))

    @staticmethod
    def backward(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic, aux=False):
        from .kernels.memory import empty

        (M, K), N, r = x.shape, weight.shape[0], lora_A.shape[0]
        grad_dtype = lora_A.dtype
        lora_A, lora_B = like_x(x, lora_A, lora_B)  # the CUDA C++ kernels take one dtype
        grad_y, x, weight, lora_A, lora_B = (t.contiguous() for t in (grad_y, x, weight, lora_A, lora_B))
        f32 = dict(dtype=torch.float32, device=x.device)
        if deterministic:  # one partial per row tile, summed in a fixed order: bitwise repeatable
            parts = -(-M // CudaBackend.BWD_BLOCK_M)
            da, db = empty((parts, r, K), x.device, torch.float32), empty((parts, N, r), x.device, torch.float32)
        else:  # fp32 atomics into zeroed buffers (separate ones: the op's outputs must not alias each other)
            da, db = torch.zeros((r, K), **f32), torch.zeros((N, r), **f32)
        dx = empty((M, K), x.device, x.dtype) if need_dx else None
        torch.ops.lora_kernels_cuda.backward(grad_y, x, weight, lora_A, lora_B, xa.float().contiguous(),
                                             seed if dropout_p > 0 else None, dx, da, db, float(scaling),
                                             float(dropout_p), bool(deterministic))
        if deterministic:
            da, db = da.sum(0), db.sum(0)
        return (dx if need_dx else x.new_empty((0,))), da.to(grad_dtype), db.to(grad_dtype)


def _quantized_forward(x, qw, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa, xa_splits=0, aux=False):
    from .kernels.quantized import lora_forward_quantized

    return lora_forward_quantized(x, qw, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa, xa_splits)


# --------------------------------------------------------------------------------------------
# LoRA on MoE experts (lora_kernels.experts): slots sorted by expert, W0 [E, N, K] (or [E, K, N] transposed),
# A [E, r, K], B [E, N, r], offsets [E]. Same contract for every variant:
#   forward(x, weight, bias, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p, save_xa, transposed, aux)
#       -> (y [S, N], xa [S, r] fp32 or empty)
#   backward(grad_y, x, weight, lora_A, lora_B, xa, offsets, gather, seed, scaling, dropout_p, need_dx,
#            deterministic, transposed, aux) -> (dx [T, K] or empty, dA, dB)
# --------------------------------------------------------------------------------------------
def _experts_torch_forward(x, weight, bias, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p, save_xa,
                           transposed, aux=False):
    y, xa = reference.experts_forward(x, weight, bias, *like_x(x, lora_A, lora_B), offsets, gather, scaling,
                                      dropout_p, seed_int(seed), transposed)
    return y, (xa.to(_xa_dtype(x.dtype)) if save_xa else x.new_empty((0,), dtype=_xa_dtype(x.dtype)))


def _experts_torch_backward(grad_y, x, weight, lora_A, lora_B, xa, offsets, gather, seed, scaling, dropout_p,
                            need_dx, deterministic, transposed, aux=False):
    dx, da, db = reference.experts_backward(grad_y, x, weight, *like_x(x, lora_A, lora_B), xa, offsets, gather,
                                            scaling, dropout_p, seed_int(seed), transposed, need_dx)
    return (dx if need_dx else _empty_like_none(x)), da.to(lora_A.dtype), db.to(lora_B.dtype)


def _experts_aten_forward(x, weight, bias, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p, save_xa,
                          transposed, aux=False):
    """Split LoRA: grouped(x, W0) + bias + s grouped(grouped(dropout(x), A^T), B^T), W0 + s B A never formed."""
    from .grouped import Bounds, expert_of_slots, grouped_mm

    a, b = like_x(x, lora_A, lora_B)
    bounds = Bounds(offsets)
    xs = x if gather is None else x[gather]
    y = grouped_mm(xs, weight if transposed else weight.transpose(1, 2), offsets, bounds)
    if bias is not None:
        y += bias.index_select(0, expert_of_slots(offsets, xs.shape[0]))
    xa = grouped_mm(dropped(xs, seed, dropout_p, in_place=gather is not None, kernels=aux), a.transpose(1, 2),
                    offsets, bounds)
    y += grouped_mm(xa * scaling, b.transpose(1, 2), offsets, bounds)
    # (torch._grouped_mm pads a narrow output's rows to 16 bytes: the saved product is contiguous, as the op says)
    return y, (xa.to(_xa_dtype(x.dtype)).contiguous() if save_xa else x.new_empty((0,), dtype=_xa_dtype(x.dtype)))


def _experts_aten_backward(grad_y, x, weight, lora_A, lora_B, xa, offsets, gather, seed, scaling, dropout_p,
                           need_dx, deterministic, transposed, aux=False):
    from .grouped import Bounds, grouped_mm, grouped_mm_t, scatter_rows

    a, b = like_x(x, lora_A, lora_B)
    bounds = Bounds(offsets)
    xs = x if gather is None else x[gather]
    g = grouped_mm(grad_y, b, offsets, bounds).mul_(scaling)
    grad_A = grouped_mm_t(g, dropped(xs, seed, dropout_p, kernels=aux), offsets, bounds)
    grad_B = grouped_mm_t(grad_y, (xa * scaling).to(grad_y.dtype), offsets, bounds)
    dx = _empty_like_none(x)
    if need_dx:
        dxs = dropped(grouped_mm(g, a, offsets, bounds), seed, dropout_p, in_place=True, kernels=aux)
        dxs += grouped_mm(grad_y, weight.transpose(1, 2) if transposed else weight, offsets, bounds)
        dx = scatter_rows(dxs, gather, x.shape[0])
    return dx, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype)


def _experts_triton_forward(x, weight, bias, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p, save_xa,
                            transposed, aux=False):
    from .kernels.experts import experts_forward

    return experts_forward(x, weight, bias, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p, save_xa,
                           transposed)


def _experts_triton_backward(grad_y, x, weight, lora_A, lora_B, xa, offsets, gather, seed, scaling, dropout_p,
                             need_dx, deterministic, transposed, aux=False):
    from .kernels.experts import experts_backward

    return experts_backward(grad_y, x, weight, lora_A, lora_B, xa, offsets, gather, seed, scaling, dropout_p,
                            need_dx, transposed)


BACKENDS = {b.name: b for b in (TorchBackend, AtenBackend, TritonBackend, CudaBackend)}


class Variant(NamedTuple):
    """One implementation of a pass. `takes`: "dense" (a single adapter over W0 [N, K]: LoRA, DoRA's inner passes,
    QLoRA over a dequantized W0), "quantized" (a single adapter over the quantized W0 itself), "mixed" (stacked
    adapters, one per row) or "experts" (an adapter per expert over W0 [E, N, K], slots sorted by expert)."""

    name: str
    family: str
    direction: str
    takes: str
    run: Callable


# The one table of variants: the planner's names, families and fit rules (lora_kernels.plan) and every kind's
# forward and backward read it; launchers take the variant they are given and decide nothing.
VARIANTS = (
    Variant("torch", "torch", "forward", "dense", TorchBackend.forward),
    Variant("aten", "aten", "forward", "dense", AtenBackend.forward),
    Variant("triton_fused", "triton", "forward", "dense", TritonBackend.forward_as("fused")),
    Variant("triton_xa_first", "triton", "forward", "dense", TritonBackend.forward_as("xa_first")),
    Variant("triton_cublas", "triton", "forward", "dense", TritonBackend.forward_as("cublas")),
    Variant("cuda_tiled", "cuda", "forward", "dense", functools.partial(CudaBackend.forward, decode=False)),
    Variant("cuda_decode", "cuda", "forward", "dense", functools.partial(CudaBackend.forward, decode=True)),
    Variant("triton_quantized", "triton", "forward", "quantized", _quantized_forward),
    Variant("torch", "torch", "backward", "dense", TorchBackend.backward),
    Variant("aten", "aten", "backward", "dense", AtenBackend.backward),
    Variant("triton_split", "triton", "backward", "dense", TritonBackend.backward_as("split")),
    Variant("triton_fused", "triton", "backward", "dense", TritonBackend.backward_as("fused")),
    Variant("cuda", "cuda", "backward", "dense", CudaBackend.backward),
    Variant("torch", "torch", "forward", "mixed", TorchBackend.mixed_forward),
    Variant("triton_gated", "triton", "forward", "mixed", TritonBackend.mixed_forward_as("gated")),
    Variant("triton_gated_cublas", "triton", "forward", "mixed", TritonBackend.mixed_forward_as("gated_cublas")),
    Variant("triton_sorted", "triton", "forward", "mixed", TritonBackend.mixed_forward_as("sorted")),
    Variant("torch", "torch", "backward", "mixed", TorchBackend.mixed_backward),
    Variant("triton_split", "triton", "backward", "mixed", TritonBackend.mixed_backward),
    Variant("torch", "torch", "forward", "experts", _experts_torch_forward),
    Variant("aten", "aten", "forward", "experts", _experts_aten_forward),
    Variant("triton_grouped", "triton", "forward", "experts", _experts_triton_forward),
    Variant("torch", "torch", "backward", "experts", _experts_torch_backward),
    Variant("aten", "aten", "backward", "experts", _experts_aten_backward),
    Variant("triton_grouped", "triton", "backward", "experts", _experts_triton_backward),
)


def _table(direction: str, takes: str) -> dict:
    return {v.name: v.run for v in VARIANTS if v.direction == direction and v.takes == takes}


FORWARD, BACKWARD = _table("forward", "dense"), _table("backward", "dense")
QUANTIZED_FORWARD = _table("forward", "quantized")
MIXED_FORWARD, MIXED_BACKWARD = _table("forward", "mixed"), _table("backward", "mixed")
EXPERTS_FORWARD, EXPERTS_BACKWARD = _table("forward", "experts"), _table("backward", "experts")
FAMILY_OF = {v.name: v.family for v in VARIANTS}


# --------------------------------------------------------------------------------------------
# Availability
# --------------------------------------------------------------------------------------------
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """A warning once per process and key (a fallback's reason): loud, not repeated per call."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def reset_warnings() -> None:
    """Let every warn_once key warn again (tests, or a long process that wants to see fallbacks anew)."""
    _warned.clear()


def status(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, str | None]:
    """{backend family: None if usable, else the reason} for tensors on `device` of `dtype`."""
    return {name: b.unavailable_reason(device, dtype) for name, b in BACKENDS.items()}
