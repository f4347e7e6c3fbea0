"""The op contract of lora-kernels: schemas, fake (meta) implementations, autograd, and the public functions.

Two named ops live in the ``lora_kernels`` namespace (and two for mixed batches, below):

``lora_kernels::lora_linear_fwd(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, grads, plan)
    -> (y, xa)``
    x [M, K]; weight W0 [N, K]; bias [N] or None; lora_A [r, K]; lora_B [N, r]; seed: one-element int64
    tensor on x's device (None when dropout_p == 0); grads: what the backward will need (0: nothing, inference;
    1: the adapters' grads; 2: and x's), which is also how the planner keys the call.
    y [M, N] = x W0^T + bias + scaling * (dropout(x) A^T) B^T, in x's dtype;
    xa [M, r] = dropout(x) A^T in fp32 (fp64 for fp64 inputs) if grads > 0, else an empty tensor.
``lora_kernels::lora_linear_bwd(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx,
                                deterministic, plan) -> (dx, dA, dB)``
    dx [M, K] (an empty tensor when need_dx is False), dA [r, K], dB [N, r]; deterministic asks for bitwise
    repeatable results (no float atomics).

``plan`` is "auto", a backend family, or a plan spec ("triton_fused+aten", see ``lora_kernels.plan``); the op
resolves it for its concrete shapes when it runs, from the plan cache or the static defaults, never timing anything
(this is what graphs traced by torch.compile hold: shapes and dropout probabilities may be symbolic while tracing).
Dropout is inverted dropout with the counter-based mask of ``reference.dropout_keep_mask``: a pure
function of (seed, row, column), so the backward regenerates it instead of storing it.

``lora_linear`` (the public function) applies torch.autocast's rule for linear layers (``autocast_inputs``; torch
gives custom ops none), checks arguments, draws the seed and takes the one entry path of every kind of call
(``lora_kernels.entry``): the op under torch.compile or for tensor subclasses, else the same variant functions
behind one autograd.Function. Grads of weight and bias, if they require grad, are computed too (plain GEMM and sum
in the backward). The argument contract itself is ``lora_kernels.contract``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, entry
from . import plan as planner
from .contract import (adapters_for, autocast_dtype, autocast_inputs, check_args, check_index_tensor,
                       check_probability, check_scaling, check_seed, draw_seed, grads_needed, is_plain,
                       master_adapters, resolve_seed)
from .plan import Call

__all__ = ["lora_linear", "lora_linear_fwd", "lora_linear_bwd", "check_args", "lora_linear_mixed", "stack_adapters",
           "lora_mixed_fwd", "lora_mixed_bwd", "check_mixed_args", "check_mixed_values", "autocast_dtype",
           "autocast_inputs", "adapters_for", "master_adapters", "draw_seed", "check_index_tensor", "linear_call",
           "mixed_call", "LORA", "MIXED"]


# --------------------------------------------------------------------------------------------
# The LoRA kind: args = (x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p)
# --------------------------------------------------------------------------------------------
def _lora_call(args, grads) -> Call:
    x, weight, _, lora_A, _, _, _, dropout_p = args
    return Call(x.device, x.dtype, x.shape[0], weight.shape[1], weight.shape[0], lora_A.shape[0], dropout_p > 0.0,
                grads, torch.are_deterministic_algorithms_enabled())


def _lora_forward(plan, args, save):
    return backends.FORWARD[plan.forward](*args, save, plan.xa_splits, plan.aux)


def _lora_backward(plan, grad_y, args, saved, need_dx, deterministic):
    x, weight, _, lora_A, lora_B, seed, scaling, dropout_p = args
    return backends.BACKWARD[plan.backward](grad_y, x, weight, lora_A, lora_B, saved[0], seed, scaling, dropout_p,
                                            need_dx, deterministic, plan.aux)


def _lora_backward_op(grad_y, args, saved, need_dx, deterministic, spec):
    x, weight, _, lora_A, lora_B, seed, scaling, dropout_p = args
    return torch.ops.lora_kernels.lora_linear_bwd(grad_y, x, weight, lora_A, lora_B, saved[0], seed, scaling,
                                                  dropout_p, need_dx, deterministic, spec)


LORA = entry.Kind("lora", "lora_linear_fwd", _lora_forward, _lora_backward, _lora_backward_op, _lora_call, n_args=8,
                  tensors=(0, 1, 2, 3, 4, 5), trained=(3, 4), kept=(0, 1, 3, 4, 5), bias=2, weight=1)


# --------------------------------------------------------------------------------------------
# Forward and backward ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("lora_kernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    seed: Optional[Tensor], scaling: float, dropout_p: float, grads: int,
                    plan: str) -> tuple[Tensor, Tensor]:
    check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    check_seed(seed, x.device, dropout_p)
    args = (x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p)
    return _lora_forward(planner.resolve_spec(plan, _lora_call(args, grads)), args, grads > 0)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, grads, plan):
    check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    xa_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.new_empty((x.shape[0], weight.shape[0]))
    xa = x.new_empty((x.shape[0], lora_A.shape[0]) if grads else (0,), dtype=xa_dtype)
    return y, xa


@torch.library.custom_op("lora_kernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
                    seed: Optional[Tensor], scaling: float, dropout_p: float, need_dx: bool,
                    deterministic: bool, plan: str) -> tuple[Tensor, Tensor, Tensor]:
    M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    if tuple(grad_y.shape) != (M, N):
        raise ValueError(f"grad_y: expected shape [{M}, {N}], got {tuple(grad_y.shape)}")
    if tuple(xa.shape) != (M, r):
        raise ValueError(f"xa: expected the saved [{M}, {r}] product of the forward (grads > 0), "
                         f"got shape {tuple(xa.shape)}")
    check_seed(seed, x.device, dropout_p)
    args = (x, weight, None, lora_A, lora_B, seed, scaling, dropout_p)
    chosen = planner.resolve_spec(plan, _lora_call(args, 2 if need_dx else 1))
    return _lora_backward(chosen, grad_y, args, (xa,), need_dx, deterministic)


@lora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic, plan):
    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


entry.register_op_autograd(lora_linear_fwd, LORA)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------
def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                scaling: float, dropout_p: float = 0.0, *, backend: str = "auto",
                seed: Optional[Tensor] = None) -> Tensor:
    """y = x W0^T + bias + scaling * (dropout(x) A^T) B^T, fused; x may have any leading dims.

    Dropout (inverted, like torch) applies whenever dropout_p > 0; pass ``seed`` (one-element int64
    tensor) to fix the mask, otherwise one is drawn from torch's generator. ``backend``: "auto" (the planner's
    choice, measured on CUDA), a family ("torch", "aten", "triton", "cuda"), or a plan spec ("triton_fused+aten").
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    lora_A, lora_B = adapters_for(x, lora_A, lora_B)
    check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    planner.check_name(backend)
    return linear_call(x, weight, bias, lora_A, lora_B, float(scaling), float(dropout_p), backend, seed)


def linear_call(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, backend: str, seed):
    """lora_linear after its checks (the layers call this with arguments they have checked)."""
    seed = resolve_seed(seed, x, dropout_p)
    args = (x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, seed, scaling, dropout_p)
    return entry.run(LORA, args, x.shape[:-1], backend, grads_needed(x, weight, bias, lora_A, lora_B))


# --------------------------------------------------------------------------------------------
# Mixed batches: several adapters over one base layer, one adapter per row, one launch.
# --------------------------------------------------------------------------------------------
# lora_kernels::lora_mixed_fwd(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps,
#                              seed, save, backend) -> (y, xs)
#     lora_A [R, K] / lora_B [N, R]: the adapters' A and B concatenated along the rank (stack_adapters);
#     rank_owner [R] (int): the adapter of each rank column; adapter_ids [M] (int): each row's adapter, -1 for
#     the base layer alone; scalings / dropout_ps: one per adapter. y[m] = x[m] W0^T + bias
#     + s_i (dropout_i(x)[m] A_i^T) B_i^T with i = adapter_ids[m]; xs [M, R] fp32 = the gated, scaled
#     dropout(x) A^T (zero off each row's own ranks) if save, else empty.
# lora_kernels::lora_mixed_bwd(grad_y, x, weight, lora_A, lora_B, xs, adapter_ids, rank_owner, scalings,
#                              dropout_ps, seed, need_dx, deterministic, backend) -> (dx, dA, dB)

def stack_adapters(lora_As, lora_Bs) -> tuple[Tensor, Tensor, Tensor]:
    """(lora_A [R, K], lora_B [N, R], rank_owner [R] int32) from per-adapter A_i [r_i, K] and B_i [N, r_i];
    ranks may differ. Cache the result: stacking copies every adapter."""
    if len(lora_As) == 0 or len(lora_As) != len(lora_Bs):
        raise ValueError(f"lora_As, lora_Bs: expected the same non-zero number of adapters, got {len(lora_As)} "
                         f"and {len(lora_Bs)}")
    owner = torch.cat([torch.full((a.shape[0],), i, dtype=torch.int32, device=a.device)
                       for i, a in enumerate(lora_As)])
    return torch.cat(list(lora_As), 0), torch.cat(list(lora_Bs), 1), owner


def check_mixed_args(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps) -> None:
    """check_args for each adapter's part, plus the mixed-batch arguments; x is [..., K]."""
    n = len(scalings)
    if n == 0 or len(dropout_ps) != n:
        raise ValueError(f"scalings, dropout_ps: expected one per adapter (the same non-zero length), got {n} and "
                         f"{len(dropout_ps)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[0 if name == "lora_A" else 1] < 1:
            raise ValueError(f"{name}: expected the adapters' {name[-1]} stacked along the rank (stack_adapters), "
                             f"got {tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    # shapes, dtypes and devices as for one adapter (the first rank column stands for all; rank_owner's shape ties
    # the rest)
    check_args(x, weight, bias, lora_A[:1], lora_B[:, :1], 1.0, 0.0)
    if lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"lora_B: expected shape [{weight.shape[0]}, {lora_A.shape[0]}] (out_features, stacked "
                         f"rank), got {tuple(lora_B.shape)}")
    for i, (scale, p) in enumerate(zip(scalings, dropout_ps)):
        check_scaling(f"scalings[{i}]", scale)
        check_probability(f"dropout_ps[{i}]", p)
    R = lora_A.shape[0]
    check_index_tensor("adapter_ids", adapter_ids, tuple(x.shape[:-1]), x.device)
    check_index_tensor("rank_owner", rank_owner, (R,), x.device)


def check_mixed_values(adapter_ids, rank_owner, n) -> None:
    """Range checks that read the tensors (one host sync; rank_owner may be None); skipped while tracing for
    torch.compile and while a CUDA graph is being captured (no sync allowed there)."""
    if torch.compiler.is_compiling() or not is_plain(adapter_ids, rank_owner):
        return
    if adapter_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if adapter_ids.numel() and not bool(((adapter_ids >= -1) & (adapter_ids < n)).all()):
        bad = adapter_ids[(adapter_ids < -1) | (adapter_ids >= n)][0].item()
        raise ValueError(f"adapter_ids: values must be in [-1, {n}) (-1 = base layer only), found {bad}")
    if rank_owner is not None and rank_owner.numel() and not bool(((rank_owner >= 0) & (rank_owner < n)).all()):
        raise ValueError(f"rank_owner: values must be adapter indices in [0, {n})")


# The mixed-batch kind: args = (x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps, seed)
def _mixed_call(args, grads) -> Call:
    x, weight, _, lora_A, _, _, _, scalings, dropout_ps, _ = args
    return Call(x.device, x.dtype, x.shape[0], weight.shape[1], weight.shape[0], lora_A.shape[0],
                max(dropout_ps) > 0.0, grads, torch.are_deterministic_algorithms_enabled(), len(scalings))


def _mixed_forward(plan, args, save):
    x, weight, bias, lora_A, lora_B, ids, owner, scalings, dropout_ps, seed = args
    return backends.MIXED_FORWARD[plan.forward](x, weight, bias, lora_A, lora_B, ids, owner, list(scalings),
                                                list(dropout_ps), seed, save, plan.xa_splits)


def _mixed_backward(plan, grad_y, args, saved, need_dx, deterministic):
    x, weight, _, lora_A, lora_B, ids, owner, scalings, dropout_ps, seed = args
    return backends.MIXED_BACKWARD[plan.backward](grad_y, x, weight, lora_A, lora_B, saved[0], ids, owner,
                                                  list(scalings), list(dropout_ps), seed, need_dx, deterministic)


def _mixed_backward_op(grad_y, args, saved, need_dx, deterministic, spec):
    x, weight, _, lora_A, lora_B, ids, owner, scalings, dropout_ps, seed = args
    return torch.ops.lora_kernels.lora_mixed_bwd(grad_y, x, weight, lora_A, lora_B, saved[0], ids, owner, scalings,
                                                 dropout_ps, seed, need_dx, deterministic, spec)


MIXED = entry.Kind("mixed", "lora_mixed_fwd", _mixed_forward, _mixed_backward, _mixed_backward_op, _mixed_call,
                   n_args=10, tensors=(0, 1, 2, 3, 4, 5, 6, 9), trained=(3, 4), kept=(0, 1, 3, 4, 5, 6, 9), bias=2,
                   weight=1)


@torch.library.custom_op("lora_kernels::lora_mixed_fwd", mutates_args=())
def lora_mixed_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                   adapter_ids: Tensor, rank_owner: Tensor, scalings: list[float], dropout_ps: list[float],
                   seed: Optional[Tensor], grads: int, plan: str) -> tuple[Tensor, Tensor]:
    check_mixed_args(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps)
    check_seed(seed, x.device, max(dropout_ps))
    args = (x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps, seed)
    return _mixed_forward(planner.resolve_spec(plan, _mixed_call(args, grads)), args, grads > 0)


@lora_mixed_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps, seed, grads, plan):
    check_mixed_args(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps)
    xs_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]) if grads else (0,), dtype=xs_dtype))


@torch.library.custom_op("lora_kernels::lora_mixed_bwd", mutates_args=())
def lora_mixed_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xs: Tensor,
                   adapter_ids: Tensor, rank_owner: Tensor, scalings: list[float], dropout_ps: list[float],
                   seed: Optional[Tensor], need_dx: bool, deterministic: bool,
                   plan: str) -> tuple[Tensor, Tensor, Tensor]:
    M, N, R = x.shape[0], weight.shape[0], lora_A.shape[0]
    if tuple(grad_y.shape) != (M, N):
        raise ValueError(f"grad_y: expected shape [{M}, {N}], got {tuple(grad_y.shape)}")
    if tuple(xs.shape) != (M, R):
        raise ValueError(f"xs: expected the saved [{M}, {R}] product of the forward, got shape {tuple(xs.shape)}")
    args = (x, weight, None, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps, seed)
    chosen = planner.resolve_spec(plan, _mixed_call(args, 2 if need_dx else 1))
    return _mixed_backward(chosen, grad_y, args, (xs,), need_dx, deterministic)


@lora_mixed_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, xs, adapter_ids, rank_owner, scalings, dropout_ps, seed, need_dx,
      deterministic, plan):
    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


entry.register_op_autograd(lora_mixed_fwd, MIXED)


def _mixed_hparams(scalings, dropout_ps):
    scalings = [float(s) for s in scalings]
    return scalings, [0.0] * len(scalings) if dropout_ps is None else [float(p) for p in dropout_ps]


def lora_linear_mixed(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                      rank_owner: Tensor, adapter_ids: Tensor, scalings, dropout_ps=None, *,
                      backend: str = "auto", seed: Optional[Tensor] = None) -> Tensor:
    """A mixed batch in one launch: row m of x (any leading dims) goes through adapter adapter_ids[m]
    (-1: the base layer alone). lora_A, lora_B, rank_owner come from ``stack_adapters``; scalings and
    dropout_ps (default: no dropout) have one entry per adapter. Grads reach each adapter's slice of
    lora_A / lora_B from its own rows only."""
    scalings, dropout_ps = _mixed_hparams(scalings, dropout_ps)
    planner.check_name(backend)
    x, weight, bias, lora_A, lora_B = autocast_inputs(x, weight, bias, lora_A, lora_B)
    check_mixed_args(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps)
    check_mixed_values(adapter_ids, rank_owner, len(scalings))
    return mixed_call(x, weight, bias, lora_A, lora_B, rank_owner, adapter_ids.reshape(-1), scalings, dropout_ps,
                      backend, seed)


def mixed_call(x, weight, bias, lora_A, lora_B, rank_owner, flat_ids, scalings, dropout_ps, backend, seed):
    """lora_linear_mixed after its checks (callers that checked the ids and built rank_owner themselves, like
    FusedLoRALinear, call this with flat_ids [rows of x])."""
    seed = resolve_seed(seed, x, max(dropout_ps))
    args = (x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, flat_ids, rank_owner, scalings, dropout_ps,
            seed)
    return entry.run(MIXED, args, x.shape[:-1], backend, grads_needed(x, weight, bias, lora_A, lora_B))
