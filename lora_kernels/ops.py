"""The op contract of lora-kernels: schemas, argument checks, fake (meta) implementations, autograd.

Two named ops live in the ``lora_kernels`` namespace (and two for mixed batches, below):

``lora_kernels::lora_linear_fwd(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa, plan)
    -> (y, xa)``
    x [M, K]; weight W0 [N, K]; bias [N] or None; lora_A [r, K]; lora_B [N, r]; seed: one-element int64
    tensor on x's device (None when dropout_p == 0).
    y [M, N] = x W0^T + bias + scaling * (dropout(x) A^T) B^T, in x's dtype;
    xa [M, r] = dropout(x) A^T in fp32 (fp64 for fp64 inputs) if save_xa, else an empty tensor.
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
gives custom ops none), flattens leading dims, checks arguments, draws the seed, asks the planner for the plan
(once per call; the backward runs the plan saved on the autograd context) and calls the forward op; autograd is
registered on the forward op, so torch.compile traces it without a graph break. Outside torch.compile, on plain
tensors, it calls the same variant functions through a plain autograd.Function instead (``_EagerLoRALinear``): same
checks, same results, less host time. Grads of weight and bias, if they require grad, are computed too (plain GEMM
and sum in the backward).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import backends
from . import plan as planner
from .plan import Call

__all__ = ["lora_linear", "lora_linear_fwd", "lora_linear_bwd", "check_args", "lora_linear_mixed", "stack_adapters",
           "lora_mixed_fwd", "lora_mixed_bwd", "check_mixed_values", "autocast_dtype", "autocast_inputs"]


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def master_adapters(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """Adapters kept in fp32 next to a 16-bit x (as PEFT keeps them): the ops take them as they are, compute as if
    they were rounded to x's dtype first, and return their grads in fp32 (no cast ops, no cast copies)."""
    return adapter_dtype == torch.float32 and x_dtype in _SIXTEEN_BIT


def _fmt_dtype(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    """Raise a ValueError/TypeError naming the argument and the expected value; x is [..., K]."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    if x.dtype not in backends.ALL_DTYPES:
        raise TypeError(f"x: unsupported dtype {x.dtype}; expected one of {_fmt_dtype(backends.ALL_DTYPES)}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor [out_features, in_features], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x: last dimension must be in_features = {K} (weight.shape[1]), got shape {tuple(x.shape)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A: expected shape [r, {K}], got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"rank r (lora_A.shape[0]) must be >= 1, got {r}")
    if r > min(N, K):
        raise ValueError(f"rank r = {r} must be <= min(in_features, out_features) = {min(N, K)}")
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B: expected shape [{N}, {r}] (out_features, r), got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias: expected shape [{N}], got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is None:
            continue
        if t.dtype != x.dtype and not (name.startswith("lora") and master_adapters(x.dtype, t.dtype)):
            raise TypeError(f"{name}: dtype {t.dtype} does not match x's dtype {x.dtype}"
                            + (" (adapters may also be float32)" if x.dtype in _SIXTEEN_BIT else "")
                            + "; cast one of them")
        if t.device != x.device:
            raise ValueError(f"{name}: on device {t.device}, expected x's device {x.device}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B: dtype {lora_B.dtype} does not match lora_A's dtype {lora_A.dtype}")
    _check_scaling("scaling", scaling)
    _check_probability("dropout_p", dropout_p)


# While torch.compile traces, a float that differs between compiled layers (alpha / r, dropout) is symbolic and has
# no value to check: values are checked when the op runs (its implementation checks again, with plain numbers,
# before any kernel). Types are checked either way.
def _check_scaling(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
            not torch.compiler.is_compiling() and not math.isfinite(v)):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")


def _check_probability(name, p):
    if isinstance(p, bool) or not isinstance(p, (int, float)) or (
            not torch.compiler.is_compiling() and not 0.0 <= p < 1.0):
        raise ValueError(f"{name}: expected a probability in [0, 1), got {p!r}")


def _check_seed(seed, device, dropout_p):
    if dropout_p > 0.0:
        if seed is None or seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError("seed: dropout_p > 0 needs a one-element int64 tensor")
        if seed.device != device:
            raise ValueError(f"seed: on device {seed.device}, expected x's device {device}")


def autocast_dtype(x) -> Optional[torch.dtype]:
    """The dtype torch.autocast runs linear layers in on x's device here and now, or None when it is off there
    (or x is no tensor: the argument checks then say so).

    torch gives custom ops no autocast rule (their inputs arrive as they are), so the public functions apply
    the rule autocast applies to nn.Linear themselves (``autocast_inputs``): inside ``torch.autocast("cuda",
    torch.bfloat16)`` a layer with fp32 weights takes bf16 or fp32 activations, computes in bf16 and returns
    bf16, as nn.Linear and PEFT's layers do there. The backends then need no autocast handling of their own:
    their inputs all arrive in autocast's dtype (autocast leaves products of 16-bit tensors as they are) or in
    fp64 (which autocast never casts)."""
    if not isinstance(x, Tensor):
        return None
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if kind != "meta" and torch.is_autocast_enabled(kind) else None


def autocast_inputs(x, *tensors) -> tuple:
    """(x, *tensors) as torch.autocast casts a linear layer's inputs when it is on for x's device: floating-point
    tensors other than fp64 to its dtype (differentiably: grads reach fp32 parameters in fp32), None and the rest
    as they are. Unchanged when autocast is off there."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return (x, *tensors)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (x, *tensors))


def adapters_for(x, lora_A, lora_B) -> tuple:
    """The adapters as the ops take them next to x (after autocast): as they are when of x's dtype
    or fp32 master adapters of a 16-bit x; else cast to x's dtype, differentiably (fp16 adapters in a bf16 autocast
    region, say). Any other mismatch is left for the argument checks to name."""
    if not isinstance(x, Tensor) or not isinstance(lora_A, Tensor) or not isinstance(lora_B, Tensor):
        return lora_A, lora_B
    if lora_A.dtype == x.dtype or master_adapters(x.dtype, lora_A.dtype) or x.dtype == torch.float64 or \
            not lora_A.is_floating_point() or autocast_dtype(lora_A) is None:
        return lora_A, lora_B
    return lora_A.to(x.dtype), lora_B.to(x.dtype)


# --------------------------------------------------------------------------------------------
# Forward op
# --------------------------------------------------------------------------------------------
def _call(x, weight, lora_A, dropout_p, grads, adapters=0) -> Call:
    return Call(x.device, x.dtype, x.shape[0], weight.shape[1], weight.shape[0], lora_A.shape[0], dropout_p > 0.0,
                grads, torch.are_deterministic_algorithms_enabled(), adapters)


@torch.library.custom_op("lora_kernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    seed: Optional[Tensor], scaling: float, dropout_p: float, save_xa: bool,
                    plan: str) -> tuple[Tensor, Tensor]:
    check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    _check_seed(seed, x.device, dropout_p)
    chosen = planner.resolve_spec(plan, _call(x, weight, lora_A, dropout_p, 2 if save_xa else 0))
    return backends.FORWARD[chosen.forward](x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa,
                                            chosen.xa_splits)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa, plan):
    check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    xa_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.new_empty((x.shape[0], weight.shape[0]))
    xa = x.new_empty((x.shape[0], lora_A.shape[0]) if save_xa else (0,), dtype=xa_dtype)
    return y, xa


# --------------------------------------------------------------------------------------------
# Backward op
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("lora_kernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
                    seed: Optional[Tensor], scaling: float, dropout_p: float, need_dx: bool,
                    deterministic: bool, plan: str) -> tuple[Tensor, Tensor, Tensor]:
    M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    if tuple(grad_y.shape) != (M, N):
        raise ValueError(f"grad_y: expected shape [{M}, {N}], got {tuple(grad_y.shape)}")
    if tuple(xa.shape) != (M, r):
        raise ValueError(f"xa: expected the saved [{M}, {r}] product of the forward (save_xa=True), "
                         f"got shape {tuple(xa.shape)}")
    _check_seed(seed, x.device, dropout_p)
    chosen = planner.resolve_spec(plan, _call(x, weight, lora_A, dropout_p, 2 if need_dx else 1))
    return backends.BACKWARD[chosen.backward](grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p,
                                              need_dx, deterministic)


@lora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic, plan):
    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


# --------------------------------------------------------------------------------------------
# Autograd of the forward op
# --------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa, plan = inputs
    _, xa = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
    ctx.scaling, ctx.dropout_p, ctx.plan = scaling, dropout_p, plan
    ctx.has_bias = bias is not None


def _grads(ctx, grad_y, x, run_bwd):
    """The grads of (x, weight, bias, lora_A, lora_B); run_bwd(need_dx, deterministic) runs a backward op and
    returns (dx, dA, dB). Shared by the single-adapter and the mixed-batch autograd."""
    need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
    grad_x = grad_w = grad_bias = grad_a = grad_bb = None
    if need_x or need_a or need_bb:
        dx, grad_a, grad_bb = run_bwd(need_x, torch.are_deterministic_algorithms_enabled())
        grad_x = dx if need_x else None
    if need_w:  # W0 is frozen in LoRA; computed for callers that train it anyway
        grad_w = grad_y.t() @ x
    if need_b and ctx.has_bias:
        grad_bias = grad_y.sum(0)
    return grad_x, grad_w, grad_bias, grad_a, grad_bb


def _single_grads(ctx, grad_y, call_bwd):
    x, weight, lora_A, lora_B, xa, seed = ctx.saved_tensors
    return _grads(ctx, grad_y, x, lambda need_x, det: call_bwd(grad_y, x, weight, lora_A, lora_B, xa, seed,
                                                               ctx.scaling, ctx.dropout_p, need_x, det, ctx.plan))


def _backward(ctx, grad_y, grad_xa):
    return *_single_grads(ctx, grad_y, torch.ops.lora_kernels.lora_linear_bwd), None, None, None, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------
def draw_seed(device: torch.device) -> Tensor:
    """A dropout seed from torch's generator for `device` (so torch.manual_seed makes runs repeatable)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


class _EagerLoRALinear(torch.autograd.Function):
    """The same forward/backward as the ops, called without the custom-op dispatcher, running a Plan.

    Outside torch.compile, on plain tensors, the dispatcher's Python layers (schema defaults, autograd
    wrapper, redispatch) cost more host time than a small layer's kernels take on a GPU; this path runs the
    same variant functions behind the same checks. Under torch.compile, and for tensor subclasses (DTensor,
    FakeTensor), the ops are used, so graphs still see lora_kernels::lora_linear_fwd / _bwd.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, plan):
        y, xa = backends.FORWARD[plan.forward](x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, True,
                                               plan.xa_splits)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, seed)
        ctx.scaling, ctx.dropout_p, ctx.plan = scaling, dropout_p, plan
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return *_single_grads(ctx, grad_y, _eager_bwd), None, None, None, None


def _eager_bwd(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic, plan):
    return backends.BACKWARD[plan.backward](grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p,
                                            need_dx, deterministic)


_PLAIN = (Tensor, torch.nn.Parameter)


def _plain(*tensors) -> bool:
    return all(t is None or type(t) in _PLAIN for t in tensors)


def _unflatten(y: Tensor, lead) -> Tensor:
    """y [M, N] as [*lead, N], like nn.Linear's output not marked as a view of another tensor: FSDP2 warns about
    modules returning views (an in-place op on one would bypass its backward hooks)."""
    return y if len(lead) == 1 else torch.ops.aten._unsafe_view(y, (*lead, y.shape[-1]))


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
    """lora_linear after its checks (the layers call this with arguments they have checked): the seed, the plan,
    then the op, or outside torch.compile on plain tensors the plan's variant functions without the dispatcher."""
    grad = torch.is_grad_enabled()
    need_x = grad and x.requires_grad
    save = need_x or (grad and (lora_A.requires_grad or lora_B.requires_grad or weight.requires_grad or
                                (bias is not None and bias.requires_grad)))
    seed = _seed(seed, x, dropout_p)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    grads = 2 if need_x else (1 if save else 0)
    if torch.compiler.is_compiling() or not _plain(x, weight, bias, lora_A, lora_B):
        # the op looks the plan up (cached or static, never timed) for its concrete shapes when it runs
        y, _ = torch.ops.lora_kernels.lora_linear_fwd(x2, weight, bias, lora_A, lora_B, seed, scaling, dropout_p,
                                                      save, backend)
        return _unflatten(y, lead)
    plan = planner.choose(_call(x2, weight, lora_A, dropout_p, grads), backend)
    if save:
        y = _EagerLoRALinear.apply(x2, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, plan)
    else:  # inference: no autograd node at all
        y, _ = backends.FORWARD[plan.forward](x2, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, False,
                                              plan.xa_splits)
    return _unflatten(y, lead)


def _seed(seed, x, dropout_p):
    """The dropout seed: the caller's, checked, or one drawn; None without dropout."""
    if dropout_p == 0.0:
        return None
    if seed is None:
        return draw_seed(x.device)
    _check_seed(seed, x.device, dropout_p)
    return seed


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
    # shapes, dtypes and devices as for one adapter (the first rank column stands for all; the stacked rank may
    # exceed min(K, N), each adapter's may not, and rank_owner's shape ties the rest)
    check_args(x, weight, bias, lora_A[:1], lora_B[:, :1], 1.0, 0.0)
    if lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"lora_B: expected shape [{weight.shape[0]}, {lora_A.shape[0]}] (out_features, stacked "
                         f"rank), got {tuple(lora_B.shape)}")
    for i, (scale, p) in enumerate(zip(scalings, dropout_ps)):
        _check_scaling(f"scalings[{i}]", scale)
        _check_probability(f"dropout_ps[{i}]", p)
    R = lora_A.shape[0]
    check_index_tensor("adapter_ids", adapter_ids, tuple(x.shape[:-1]), x.device)
    check_index_tensor("rank_owner", rank_owner, (R,), x.device)


def check_index_tensor(name, t, shape, device) -> None:
    """An int32 / int64 tensor of this shape on this device (x's)."""
    if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got "
                        f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on device {t.device}, expected x's device {device}")


def check_mixed_values(adapter_ids, rank_owner, n) -> None:
    """Range checks that read the tensors (one host sync; rank_owner may be None); skipped while tracing for
    torch.compile and while a CUDA graph is being captured (no sync allowed there)."""
    if torch.compiler.is_compiling() or not _plain(adapter_ids, rank_owner):
        return
    if adapter_ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if adapter_ids.numel() and not bool(((adapter_ids >= -1) & (adapter_ids < n)).all()):
        bad = adapter_ids[(adapter_ids < -1) | (adapter_ids >= n)][0].item()
        raise ValueError(f"adapter_ids: values must be in [-1, {n}) (-1 = base layer only), found {bad}")
    if rank_owner is not None and rank_owner.numel() and not bool(((rank_owner >= 0) & (rank_owner < n)).all()):
        raise ValueError(f"rank_owner: values must be adapter indices in [0, {n})")


def _mixed_call(x, weight, lora_A, dropout_ps, grads, n) -> Call:
    return _call(x, weight, lora_A, max(dropout_ps), grads, n)


@torch.library.custom_op("lora_kernels::lora_mixed_fwd", mutates_args=())
def lora_mixed_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                   adapter_ids: Tensor, rank_owner: Tensor, scalings: list[float], dropout_ps: list[float],
                   seed: Optional[Tensor], save: bool, plan: str) -> tuple[Tensor, Tensor]:
    check_mixed_args(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps)
    _check_seed(seed, x.device, max(dropout_ps))
    chosen = planner.resolve_spec(plan, _mixed_call(x, weight, lora_A, dropout_ps, 2 if save else 0, len(scalings)))
    return backends.MIXED_FORWARD[chosen.forward](x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner,
                                                  list(scalings), list(dropout_ps), seed, save, chosen.xa_splits)


@lora_mixed_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps, seed, save, plan):
    check_mixed_args(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps)
    xs_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]) if save else (0,), dtype=xs_dtype))


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
    chosen = planner.resolve_spec(plan, _mixed_call(x, weight, lora_A, dropout_ps, 2 if need_dx else 1,
                                                    len(scalings)))
    return backends.MIXED_BACKWARD[chosen.backward](grad_y, x, weight, lora_A, lora_B, xs, adapter_ids, rank_owner,
                                                    list(scalings), list(dropout_ps), seed, need_dx, deterministic)


@lora_mixed_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, xs, adapter_ids, rank_owner, scalings, dropout_ps, seed, need_dx,
      deterministic, plan):
    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


def _mixed_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps, seed, save, plan = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], adapter_ids, rank_owner, seed)
    ctx.scalings, ctx.dropout_ps, ctx.plan, ctx.has_bias = scalings, dropout_ps, plan, bias is not None


def _mixed_backward(ctx, grad_y, grad_xs, call_bwd=None):
    x, weight, lora_A, lora_B, xs, adapter_ids, rank_owner, seed = ctx.saved_tensors
    call_bwd = call_bwd or torch.ops.lora_kernels.lora_mixed_bwd
    grads = _grads(ctx, grad_y, x, lambda need_x, det: call_bwd(
        grad_y, x, weight, lora_A, lora_B, xs, adapter_ids, rank_owner, ctx.scalings, ctx.dropout_ps, seed,
        need_x, det, ctx.plan))
    return *grads, None, None, None, None, None, None, None


lora_mixed_fwd.register_autograd(_mixed_backward, setup_context=_mixed_setup_context)


class _EagerLoRAMixed(torch.autograd.Function):
    """lora_mixed_fwd / _bwd without the custom-op dispatcher (as _EagerLoRALinear for one adapter)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps, seed, save,
                plan):
        y, xs = backends.MIXED_FORWARD[plan.forward](x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner,
                                                     scalings, dropout_ps, seed, True, plan.xa_splits)
        _mixed_setup_context(ctx, (x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps,
                                   seed, save, plan), (y, xs))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _mixed_backward(ctx, grad_y, None, _eager_mixed_bwd)


def _eager_mixed_bwd(*args):
    return backends.MIXED_BACKWARD[args[-1].backward](*args[:-1])


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
    FusedLoRALinear, call this with flat_ids [rows of x]): seed, plan, then the op, or outside torch.compile
    on plain tensors the plan's variant functions without the dispatcher."""
    p = max(dropout_ps)
    grad = torch.is_grad_enabled()
    need_x = grad and x.requires_grad
    save = need_x or (grad and (lora_A.requires_grad or lora_B.requires_grad or weight.requires_grad or
                                (bias is not None and bias.requires_grad)))
    seed = _seed(seed, x, p)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    grads, n = 2 if need_x else (1 if save else 0), len(scalings)
    if torch.compiler.is_compiling() or not _plain(x, weight, bias, lora_A, lora_B, flat_ids, rank_owner):
        y, _ = torch.ops.lora_kernels.lora_mixed_fwd(x2, weight, bias, lora_A, lora_B, flat_ids, rank_owner,
                                                     scalings, dropout_ps, seed, save, backend)
        return _unflatten(y, lead)
    plan = planner.choose(_mixed_call(x2, weight, lora_A, dropout_ps, grads, n), backend)
    if save:
        y = _EagerLoRAMixed.apply(x2, weight, bias, lora_A, lora_B, flat_ids, rank_owner, scalings, dropout_ps,
                                  seed, True, plan)
    else:  # inference: no autograd node at all
        y, _ = backends.MIXED_FORWARD[plan.forward](x2, weight, bias, lora_A, lora_B, flat_ids, rank_owner, scalings,
                                                    dropout_ps, seed, False, plan.xa_splits)
    return _unflatten(y, lead)
