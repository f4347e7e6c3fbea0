"""DoRA (weight-decomposed LoRA, Liu et al. 2024) at LoRA's cost, with PEFT's semantics.

    y = g * (x W0^T + s (x A^T) B^T) + bias,        g = m / ||W0 + s B A||_row   (no dropout, or eval)
    y = x W0^T + bias + (g - 1) * (dropout(x) W0^T) + g * s (dropout(x) A^T) B^T    (dropout, in training)

The norm is a constant in the backward (the paper's section 4.3, as PEFT). It is computed without any [N, K] tensor
besides W0 itself (``reference.dora_weight_norm``; on GPUs one Triton pass over W0): ||W0_n||^2 is kept per layer
while W0 is unchanged (``DoraNorms``), W0 A^T is one pass over W0, A A^T is [r, r]; in inference the whole norm is kept
until W0 or an adapter changes.

The forward and backward are LoRA's (the planner's variants for the same call, any family) with DoRA's column scale
around them: the LoRA forward without bias gives P = x W0^T + s xa B^T (saved: the magnitude's grad is
sum_m dY * P / norm), then y = g * P + bias in one pass; the backward scales dY by g and sums the magnitude's grad in
one pass, then runs LoRA's backward on the scaled dY. With dropout PEFT applies the magnitude to the base product of
dropout(x), so the base GEMM runs twice, on x and on dropout(x) (forward), and the dX GEMM twice (backward): DoRA with
dropout costs about two LoRA layers, as PEFT's does. Mixed-adapter batches with DoRA adapters are refused.

Ops: ``lora_kernels::dora_linear_fwd(x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p,
save, plan) -> (y, xa, product)`` and ``lora_kernels::dora_linear_bwd(grad_y, x, weight, lora_A, lora_B, magnitude,
norm, xa, product, seed, scaling, dropout_p, need_dx, deterministic, plan) -> (dx, dA, dB, d_magnitude)``.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor

from . import backends, entry, quantized, reference
from . import plan as planner
from .contract import (adapters_for, autocast_inputs, check_args, check_seed, grads_needed, is_plain, like_x,
                       master_adapters, resolve_seed, seed_int)
from .plan import Call

__all__ = ["dora_linear", "dora_weight_norm", "DoraNorms", "dora_linear_fwd", "dora_linear_bwd", "qdora_linear",
           "qdora_linear_fwd", "qdora_linear_bwd"]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# The weight norm
# --------------------------------------------------------------------------------------------
def dora_weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, w0_sq: Tensor | None = None,
                     kernels: bool = True):
    """(||W0_n + s (B A)_n|| [N], ||W0_n||^2 [N]) in fp32 (fp64 for fp64 weights), detached, without an [N, K]
    tensor besides W0: one Triton pass over W0 where `kernels` asks for it and Triton runs, else the reference's row
    chunks in plain PyTorch."""
    weight, lora_A, lora_B = weight.detach(), lora_A.detach(), lora_B.detach()
    if kernels and backends.triton_serves(weight.device, weight.dtype):
        from .kernels.dora import weight_norm

        return weight_norm(weight, lora_A, lora_B, scaling, w0_sq)
    acc = _acc(weight.dtype)
    if w0_sq is None:
        w0_sq = reference.dora_weight_norm(weight, lora_A[:0], lora_B[:, :0], 0.0).square()
    return reference.dora_weight_norm(weight, lora_A, lora_B, scaling, w0_sq), w0_sq.to(acc)


@torch.library.custom_op("lora_kernels::dora_weight_norm", mutates_args=())
def dora_weight_norm_op(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, kernels: bool) -> Tensor:
    """The row norms as an op (what graphs traced by torch.compile hold: the Triton pass is opaque to them)."""
    return dora_weight_norm(weight, lora_A, lora_B, scaling, kernels=kernels)[0]


@dora_weight_norm_op.register_fake
def _(weight, lora_A, lora_B, scaling, kernels):
    return weight.new_empty((weight.shape[0],), dtype=_acc(weight.dtype))


def _fingerprint(t: Tensor):
    return t._version, t.data_ptr(), t.shape, t.dtype


class DoraNorms:
    """One layer's kept norms: ||W0_n||^2 while W0 is the same tensor, unchanged (it is frozen), and in inference the
    whole norm while W0, A and B are unchanged (a training step recomputes it: the adapters change every step)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._sq = None  # (weak ref to W0, fingerprint, squares)
        self._norm = None  # (weak refs and fingerprints of W0, A, B, scaling, norm)

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.clear()

    def get(self, weight, lora_A: Tensor, lora_B: Tensor, scaling: float, kernels: bool = True,
            key: Tensor | None = None) -> Tensor:
        """The norm for these tensors (`kernels`: ``plan.aux_kernels_for`` of the call's backend). `weight` may be a
        function giving W0 (a quantized base dequantizes it only when a norm is computed); `key` then stands for it
        in the kept entries (the quantized codes)."""
        if key is not None:
            dense = weight
        else:
            key, dense = weight, (lambda: weight)
        if torch.compiler.is_compiling() or not is_plain(key, lora_A, lora_B) or key.is_inference() \
                or key.device.type == "meta":
            return torch.ops.lora_kernels.dora_weight_norm(dense().detach(), lora_A.detach(), lora_B.detach(),
                                                           float(scaling), kernels)
        weight = key
        tensors = (weight, lora_A, lora_B)
        frozen = not (torch.is_grad_enabled() and (lora_A.requires_grad or lora_B.requires_grad))
        kept = self._norm
        if frozen and kept is not None and kept[1] == scaling and all(
                ref() is t and fp == _fingerprint(t) for (ref, fp), t in zip(kept[0], tensors)):
            return kept[2]
        sq = self._sq
        w0_sq = sq[2] if sq is not None and sq[0]() is weight and sq[1] == _fingerprint(weight) else None
        with torch.no_grad(), torch.inference_mode(False):
            norm, squares = dora_weight_norm(dense(), lora_A, lora_B, scaling, w0_sq, kernels)
        if w0_sq is None:
            self._sq = (weakref.ref(weight), _fingerprint(weight), squares)
        self._norm = ((tuple((weakref.ref(t), _fingerprint(t)) for t in tensors), scaling, norm) if frozen and
                      not any(t.is_inference() for t in tensors) else None)
        return norm


# --------------------------------------------------------------------------------------------
# Variants: LoRA's for the call, with DoRA's column scale around them
# --------------------------------------------------------------------------------------------
def _column_scale(magnitude, norm, dtype):
    acc = _acc(dtype)
    return magnitude.to(acc) / norm.to(acc)


def _triton_glue(plan, x) -> bool:
    return plan.aux and backends.triton_serves(x.device, x.dtype)


def _forward(plan, x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p, save):
    acc = _acc(x.dtype)
    empty_xa = x.new_empty((0,), dtype=acc)
    if plan.forward == "torch":
        a, b = like_x(x, lora_A, lora_B)
        y, xa, product = reference.dora_forward(x, weight, bias, a, b, magnitude, norm, scaling, dropout_p,
                                                seed_int(seed))
        return y, (xa.to(acc) if save else empty_xa), (product if save else x.new_empty((0,)))
    g = _column_scale(magnitude, norm, x.dtype)
    forward = backends.FORWARD[plan.forward]
    if dropout_p == 0.0:
        product, xa = forward(x, weight, None, lora_A, lora_B, None, scaling, 0.0, save, plan.xa_splits, plan.aux)
        extra = None
    else:  # the LoRA product on dropout(x), and x W0^T - dropout(x) W0^T for the undropped base path
        xd = backends.dropped(x, seed, dropout_p, kernels=plan.aux)
        product, xa = forward(xd, weight, None, lora_A, lora_B, None, scaling, 0.0, save, plan.xa_splits, plan.aux)
        extra = torch.mm(torch.sub(x, xd, out=xd), weight.t())
    if _triton_glue(plan, x):
        from .kernels.dora import scale

        y = scale(product, g, bias, extra, x.dtype)
    else:
        y = product.to(acc) * g
        if extra is not None:
            y += extra
        if bias is not None:
            y += bias
        y = y.to(x.dtype)
    return y, (xa if save else empty_xa), (product if save else x.new_empty((0,)))


def _backward(plan, grad_y, x, weight, lora_A, lora_B, magnitude, norm, xa, product, seed, scaling, dropout_p,
              need_dx, deterministic):
    if plan.backward == "torch":
        a, b = like_x(x, lora_A, lora_B)
        dx, da, db, dm = reference.dora_backward(grad_y, x, weight, a, b, magnitude, norm, xa, product, scaling,
                                                 dropout_p, seed_int(seed), need_dx)
        return (dx if need_dx else x.new_empty((0,))), da.to(lora_A.dtype), db.to(lora_B.dtype), dm
    g = _column_scale(magnitude, norm, x.dtype)
    rest = dropout_p > 0.0 and need_dx
    if _triton_glue(plan, x):
        from .kernels.dora import grad_scale

        grad_g, grad_rest, dm = grad_scale(grad_y, product, g, rest)
    else:
        acc = _acc(x.dtype)
        dy = grad_y.to(acc)
        dm = (dy * product.to(acc)).sum(0)
        grad_g = (dy * g).to(x.dtype)
        grad_rest = (dy - dy * g).to(x.dtype) if rest else None
    dx, da, db = backends.BACKWARD[plan.backward](grad_g, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p,
                                                  need_dx, deterministic, plan.aux)
    if rest:  # dropout's base path: + (dY (1 - g)) W0 outside the mask, (the mask's part is in LoRA's dX)
        extra = torch.mm(grad_rest, weight)
        dx = dx.add_(extra).sub_(backends.dropped(extra, seed, dropout_p, in_place=True,
                                                  kernels=plan.aux))
    return dx, da, db, (dm / norm.to(dm.dtype)).to(magnitude.dtype)


# --------------------------------------------------------------------------------------------
# Argument checks and ops
# --------------------------------------------------------------------------------------------
def check_dora_args(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p) -> None:
    check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    N = weight.shape[0]
    if not isinstance(magnitude, Tensor) or tuple(magnitude.shape) != (N,):
        raise ValueError(f"magnitude: expected a tensor of shape [{N}] (out_features), got "
                         f"{tuple(magnitude.shape) if isinstance(magnitude, Tensor) else type(magnitude).__name__}")
    if magnitude.dtype != lora_A.dtype:
        raise TypeError(f"magnitude: dtype {magnitude.dtype} does not match lora_A's dtype {lora_A.dtype}")
    if magnitude.device != x.device:
        raise ValueError(f"magnitude: on device {magnitude.device}, expected x's device {x.device}")
    if norm is not None and (not isinstance(norm, Tensor) or tuple(norm.shape) != (N,) or norm.device != x.device):
        raise ValueError(f"norm: expected the [{N}] row norms on x's device (dora_weight_norm)")


# The DoRA kind: args = (x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p). Its forward runs
# LoRA's forward variant without dropout (on dropout(x)), its backward LoRA's backward with it: the key says so.
def _call(args, grads) -> Call:
    x, weight, _, lora_A, _, _, _, _, _, dropout_p = args
    return Call(x.device, x.dtype, x.shape[0], weight.shape[1], weight.shape[0], lora_A.shape[0], dropout_p > 0.0,
                grads, torch.are_deterministic_algorithms_enabled(), dora=True)


def _kind_forward(plan, args, save):
    return _forward(plan, *args, save)


def _kind_backward(plan, grad_y, args, saved, need_dx, deterministic):
    x, weight, _, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p = args
    return _backward(plan, grad_y, x, weight, lora_A, lora_B, magnitude, norm, *saved, seed, scaling, dropout_p,
                     need_dx, deterministic)


def _kind_backward_op(grad_y, args, saved, need_dx, deterministic, spec):
    x, weight, _, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p = args
    return torch.ops.lora_kernels.dora_linear_bwd(grad_y, x, weight, lora_A, lora_B, magnitude, norm, *saved, seed,
                                                  scaling, dropout_p, need_dx, deterministic, spec)


DORA = entry.Kind("dora", "dora_linear_fwd", _kind_forward, _kind_backward, _kind_backward_op, _call, n_args=10,
                  tensors=(0, 1, 2, 3, 4, 5, 6, 7), trained=(3, 4, 5), kept=(0, 1, 3, 4, 5, 6, 7), bias=2)


@torch.library.custom_op("lora_kernels::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    magnitude: Tensor, norm: Tensor, seed: Optional[Tensor], scaling: float, dropout_p: float,
                    grads: int, plan: str) -> tuple[Tensor, Tensor, Tensor]:
    check_dora_args(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p)
    check_seed(seed, x.device, dropout_p)
    args = (x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p)
    return _kind_forward(planner.resolve_spec(plan, _call(args, grads)), args, grads > 0)


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p, grads, plan):
    check_dora_args(x, weight, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p)
    M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    return (x.new_empty((M, N)), x.new_empty((M, r) if grads else (0,), dtype=_acc(x.dtype)),
            x.new_empty((M, N) if grads else (0,)))


@torch.library.custom_op("lora_kernels::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                    norm: Tensor, xa: Tensor, product: Tensor, seed: Optional[Tensor], scaling: float,
                    dropout_p: float, need_dx: bool, deterministic: bool,
                    plan: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    for name, t, shape in (("grad_y", grad_y, (M, N)), ("xa", xa, (M, r)), ("product", product, (M, N))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    check_seed(seed, x.device, dropout_p)
    args = (x, weight, None, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p)
    chosen = planner.resolve_spec(plan, _call(args, 2 if need_dx else 1))
    return _kind_backward(chosen, grad_y, args, (xa, product), need_dx, deterministic)


@dora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, magnitude, norm, xa, product, seed, scaling, dropout_p, need_dx,
      deterministic, plan):
    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(magnitude)


entry.register_op_autograd(dora_linear_fwd, DORA)


def _magnitude_like(magnitude, lora_A, x):
    """The magnitude in the adapters' dtype (fp32 master magnitudes next to a 16-bit x as they are), differentiably;
    anything else is left for the argument checks to name."""
    if isinstance(magnitude, Tensor) and isinstance(lora_A, Tensor) and magnitude.dtype != lora_A.dtype and \
            not master_adapters(x.dtype, magnitude.dtype):
        return magnitude.to(lora_A.dtype)
    return magnitude


def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                scaling: float, dropout_p: float = 0.0, *, backend: str = "auto", seed: Optional[Tensor] = None,
                norms: DoraNorms | None = None) -> Tensor:
    """DoRA: y = m / ||W0 + s B A||_row * (x W0^T + s (dropout(x) A^T) B^T) + bias (with dropout: the magnitude on the
    base product of dropout(x), as PEFT); x may have any leading dims; grads reach x, lora_A, lora_B and magnitude.
    `norms` (a layer's DoraNorms) keeps ||W0||^2 and, in inference, the whole norm between calls."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    lora_A, lora_B = adapters_for(x, lora_A, lora_B)
    magnitude = _magnitude_like(magnitude, lora_A, x)
    check_dora_args(x, weight, bias, lora_A, lora_B, magnitude, None, scaling, dropout_p)
    planner.check_name(backend)
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError("weight: DoRA needs a frozen base weight (requires_grad=False); it trains the adapters and "
                         "the magnitude")
    scaling, dropout_p = float(scaling), float(dropout_p)
    norm = (norms or DoraNorms()).get(weight, lora_A, lora_B, scaling, planner.aux_kernels_for(backend, x.device))
    seed = resolve_seed(seed, x, dropout_p)
    args = (x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p)
    return entry.run(DORA, args, x.shape[:-1], backend, grads_needed(x, lora_A, lora_B, magnitude, bias))


# --------------------------------------------------------------------------------------------
# QDoRA: DoRA over a quantized W0 (bitsandbytes' 4-bit and 8-bit layers)
# --------------------------------------------------------------------------------------------
# args = (x, qdata, qstate, fmt, sizes, offset, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p): DoRA's
# passes on a transient dequantized W0 (freed when the forward returns, dequantized again in the backward where dX
# needs it): nothing [N, K]-sized is kept between forward and backward, as for QLoRA.
def _q_call(args, grads) -> Call:
    x, qdata, qstate, fmt, sizes, offset, _, lora_A, _, _, _, _, _, dropout_p = args
    return Call(x.device, x.dtype, x.shape[0], sizes[1], sizes[0], lora_A.shape[0], dropout_p > 0.0, grads,
                torch.are_deterministic_algorithms_enabled(), 0,
                quantized.pack(qdata, qstate, fmt, sizes, offset).quant, dora=True)


def _q_forward(plan, args, save):
    x, qdata, qstate, fmt, sizes, offset, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p = args
    weight = quantized.dequantize(quantized.pack(qdata, qstate, fmt, sizes, offset), x.dtype, plan.aux)
    return _forward(plan, x, weight, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p, save)


def _q_backward(plan, grad_y, args, saved, need_dx, deterministic):
    x, qdata, qstate, fmt, sizes, offset, _, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p = args
    qw = quantized.pack(qdata, qstate, fmt, sizes, offset)
    weight = quantized.dequantize(qw, x.dtype, plan.aux) if need_dx else quantized.stand_in_weight(qw, x)
    return _backward(plan, grad_y, x, weight, lora_A, lora_B, magnitude, norm, *saved, seed, scaling, dropout_p,
                     need_dx, deterministic)


def _q_backward_op(grad_y, args, saved, need_dx, deterministic, spec):
    x, qdata, qstate, fmt, sizes, offset, _, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p = args
    return torch.ops.lora_kernels.qdora_linear_bwd(grad_y, x, qdata, qstate, fmt, sizes, offset, lora_A, lora_B,
                                                   magnitude, norm, *saved, seed, scaling, dropout_p, need_dx,
                                                   deterministic, spec)


QDORA = entry.Kind("qdora", "qdora_linear_fwd", _q_forward, _q_backward, _q_backward_op, _q_call, n_args=14,
                   tensors=(0, 1, 2, 6, 7, 8, 9, 10, 11), trained=(7, 8, 9), kept=(0, 1, 2, 7, 8, 9, 10, 11),
                   lists=(2,), bias=6)


def check_qdora_args(x, qw, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p) -> None:
    quantized.check_qargs(x, qw, bias, lora_A, lora_B, scaling, dropout_p)
    check_dora_args(x, quantized.stand_in_weight(qw, x), bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p)


@torch.library.custom_op("lora_kernels::qdora_linear_fwd", mutates_args=())
def qdora_linear_fwd(x: Tensor, qdata: Tensor, qstate: list[Tensor], fmt: str, sizes: list[int], offset: float,
                     bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, norm: Tensor,
                     seed: Optional[Tensor], scaling: float, dropout_p: float, grads: int,
                     plan: str) -> tuple[Tensor, Tensor, Tensor]:
    qw = quantized.pack(qdata, qstate, fmt, sizes, offset)
    check_qdora_args(x, qw, bias, lora_A, lora_B, magnitude, norm, scaling, dropout_p)
    check_seed(seed, x.device, dropout_p)
    args = (x, qdata, qstate, fmt, sizes, offset, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p)
    return _q_forward(planner.resolve_spec(plan, _q_call(args, grads)), args, grads > 0)


@qdora_linear_fwd.register_fake
def _(x, qdata, qstate, fmt, sizes, offset, bias, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p, grads,
      plan):
    check_qdora_args(x, quantized.pack(qdata, qstate, fmt, sizes, offset), bias, lora_A, lora_B, magnitude, norm,
                     scaling, dropout_p)
    M, N, r = x.shape[0], sizes[0], lora_A.shape[0]
    return (x.new_empty((M, N)), x.new_empty((M, r) if grads else (0,), dtype=_acc(x.dtype)),
            x.new_empty((M, N) if grads else (0,)))


@torch.library.custom_op("lora_kernels::qdora_linear_bwd", mutates_args=())
def qdora_linear_bwd(grad_y: Tensor, x: Tensor, qdata: Tensor, qstate: list[Tensor], fmt: str, sizes: list[int],
                     offset: float, lora_A: Tensor, lora_B: Tensor, magnitude: Tensor, norm: Tensor, xa: Tensor,
                     product: Tensor, seed: Optional[Tensor], scaling: float, dropout_p: float, need_dx: bool,
                     deterministic: bool, plan: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    M, N, r = x.shape[0], sizes[0], lora_A.shape[0]
    for name, t, shape in (("grad_y", grad_y, (M, N)), ("xa", xa, (M, r)), ("product", product, (M, N))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    check_seed(seed, x.device, dropout_p)
    args = (x, qdata, qstate, fmt, sizes, offset, None, lora_A, lora_B, magnitude, norm, seed, scaling, dropout_p)
    chosen = planner.resolve_spec(plan, _q_call(args, 2 if need_dx else 1))
    return _q_backward(chosen, grad_y, args, (xa, product), need_dx, deterministic)


@qdora_linear_bwd.register_fake
def _(grad_y, x, qdata, qstate, fmt, sizes, offset, lora_A, lora_B, magnitude, norm, xa, product, seed, scaling,
      dropout_p, need_dx, deterministic, plan):
    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B), torch.empty_like(magnitude)


entry.register_op_autograd(qdora_linear_fwd, QDORA)


def qdora_linear(x: Tensor, qweight, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, magnitude: Tensor,
                 scaling: float, dropout_p: float = 0.0, *, backend: str = "auto", seed: Optional[Tensor] = None,
                 norms: DoraNorms | None = None, compute_dtype: torch.dtype | None = None) -> Tensor:
    """QDoRA: ``dora_linear`` over a quantized W0 (``quantized.quantized_weight(layer)``), computed in `compute_dtype`
    (default x's; autocast's inside a region) with y in x's dtype, as ``qlora_linear``. The weight norm is computed
    from W0 dequantized for that pass alone; `norms` keeps ||W0||^2 per layer (and the whole norm in inference)."""
    x, bias, out_dtype = quantized.compute_inputs(x, qweight, bias, compute_dtype)
    lora_A, lora_B = adapters_for(x, lora_A, lora_B)
    magnitude = _magnitude_like(magnitude, lora_A, x)
    check_qdora_args(x, qweight, bias, lora_A, lora_B, magnitude, None, scaling, dropout_p)
    planner.check_name(backend)
    scaling, dropout_p = float(scaling), float(dropout_p)
    kernels = planner.aux_kernels_for(backend, x.device)
    norm = (norms or DoraNorms()).get(lambda: quantized.dequantize(qweight, x.dtype, kernels), lora_A, lora_B,
                                      scaling, kernels, key=qweight.data)
    seed = resolve_seed(seed, x, dropout_p)
    args = (x.reshape(-1, x.shape[-1]), *quantized.unpack(qweight), bias, lora_A, lora_B, magnitude, norm, seed,
            scaling, dropout_p)
    y = entry.run(QDORA, args, x.shape[:-1], backend, grads_needed(x, lora_A, lora_B, magnitude, bias))
    return y if y.dtype == out_dtype else y.to(out_dtype)
