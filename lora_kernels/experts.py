"""LoRA on Mixture-of-Experts experts: one op for a grouped projection, and the experts block of transformers' MoE
models on it.

For slots (token, expert pairs) sorted by expert, slot s of expert e reading token g(s):

    y_s = x_{g(s)} W0_e^T + b_e + scaling * (dropout(x_{g(s)}) A_e^T) B_e^T

W0 [E, N, K] (or [E, K, N] with ``transposed``, gpt-oss's layout), bias [E, N] or None, A [E, r, K], B [E, N, r]
(strided views accepted: PEFT's factors are views of its [E r, K] / [N, r E] weights), ``offsets`` [E] the end of
each expert's slots (int32 inclusive cumsum, as transformers computes it; an expert may have none), ``gather`` [S]
the token of each slot (None: row s of x). Grads reach x (summed over each token's slots), A and B; W0 and the bias
are frozen. Saved for the backward: x, the gather, offsets, the seed and the [S, r] product xa — nothing of W0's
size, no dropout mask, no [S, N] (PEFT's ``target_parameters`` forms W0 + s B A for every expert and keeps it).

Variants (``backends.VARIANTS``, takes "experts"): ``torch`` (the reference, a loop over experts), ``aten`` (split
LoRA: grouped products, ``torch._grouped_mm`` where it takes the tensors, W0 + s B A never formed) and
``triton_grouped`` (kernels/experts.py: one launch per grouped product, the low-rank term in the GEMM's epilogue).

``experts_block(module, hidden, top_k_index, top_k_weights, adapters)`` is transformers' grouped experts forward
(sort the slots by expert, up/gate projection, the module's own gate or activation, down projection, routing
weights, back to token order) with both projections on the op: what ``inject`` and ``peft.fuse`` run for the experts
modules of Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3, gpt-oss and the other ``use_experts_implementation`` classes.

Ops: ``lora_kernels::experts_linear_fwd(x, weight, bias, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p,
transposed, grads, plan) -> (y, xa)`` and ``lora_kernels::experts_linear_bwd(grad_y, x, weight, lora_A, lora_B, xa,
offsets, gather, seed, scaling, dropout_p, transposed, need_dx, deterministic, plan) -> (dx, dA, dB)``.
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import backends, entry
from . import plan as planner
from .contract import (adapters_for, autocast_dtype, autocast_inputs, check_like_x, check_probability, check_scaling,
                       check_seed, check_tensors, grads_needed, is_plain, resolve_seed)
from .plan import Call

__all__ = ["experts_linear", "check_experts_args", "experts_linear_fwd", "experts_linear_bwd", "EXPERTS",
           "ExpertAdapter", "experts_block", "is_experts_module", "projections", "expert_features", "routing"]


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------
def _shape(t) -> str:
    return str(list(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def expert_features(weight: Tensor, transposed: bool) -> tuple[int, int]:
    """(in_features K, out_features N) of a projection over all experts: W0 [E, N, K], or [E, K, N] transposed."""
    return (weight.shape[1], weight.shape[2]) if transposed else (weight.shape[2], weight.shape[1])


def _check_index(name: str, t, length: int | None, device) -> None:
    if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got "
                        f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        raise ValueError(f"{name}: expected shape [{length if length is not None else 'S'}], got {_shape(t)}")
    if t.device != device:
        raise ValueError(f"{name}: on device {t.device}, expected x's device {device}")


def check_experts_args(x, weight, bias, lora_A, lora_B, offsets, gather, scaling, dropout_p,
                       transposed: bool = False) -> None:
    """Raise a ValueError / TypeError naming the argument and the expected value, before any kernel. Values of
    offsets and gather are read where that costs no device sync (CPU tensors); on a GPU they are the caller's
    contract (transformers' routing produces them)."""
    check_tensors(x, weight, bias, lora_A, lora_B)
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [tokens, in_features], got shape {_shape(x)}")
    if weight.dim() != 3:
        raise ValueError(f"weight: expected a 3-D tensor [experts, out_features, in_features]"
                         f"{' (transposed: [experts, in_features, out_features])' if transposed else ''}, got "
                         f"shape {_shape(weight)}")
    E = weight.shape[0]
    K, N = expert_features(weight, transposed)
    if x.shape[1] != K:
        raise ValueError(f"x: last dimension must be in_features = {K} (weight.shape[{1 if transposed else 2}]), "
                         f"got shape {_shape(x)}")
    if lora_A.dim() != 3 or lora_A.shape[0] != E or lora_A.shape[2] != K:
        raise ValueError(f"lora_A: expected shape [{E}, r, {K}] (experts, rank, in_features), got {_shape(lora_A)}")
    r = lora_A.shape[1]
    if tuple(lora_B.shape) != (E, N, r):
        raise ValueError(f"lora_B: expected shape [{E}, {N}, {r}] (experts, out_features, r), got {_shape(lora_B)}")
    if bias is not None and tuple(bias.shape) != (E, N):
        raise ValueError(f"bias: expected shape [{E}, {N}] (experts, out_features), got {_shape(bias)}")
    check_like_x(x, weight, bias, lora_A, lora_B)
    _check_index("offsets", offsets, E, x.device)
    S = x.shape[0]
    if gather is not None:
        _check_index("gather", gather, None, x.device)
        S = gather.shape[0]
    check_scaling("scaling", scaling)
    check_probability("dropout_p", dropout_p)
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and is_plain(x, offsets, gather):
        if E and (bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[0]) < 0):
            raise ValueError(f"offsets: expected each expert's end (a non-decreasing cumsum of slot counts), got "
                             f"{offsets.tolist()[:8]}{' ...' if E > 8 else ''}")
        last = int(offsets[-1]) if E else 0
        if last != S:
            raise ValueError(f"offsets: the last expert must end at the number of slots {S} "
                             f"({'gather.shape[0]' if gather is not None else 'x.shape[0]'}), got {last}")
        if gather is not None and S and (int(gather.min()) < 0 or int(gather.max()) >= x.shape[0]):
            raise ValueError(f"gather: token indices must lie in [0, {x.shape[0]}) (x's rows), got "
                             f"[{int(gather.min())}, {int(gather.max())}]")


# --------------------------------------------------------------------------------------------
# The experts kind on the entry path
# --------------------------------------------------------------------------------------------
def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _slots(x, gather) -> int:
    return x.shape[0] if gather is None else gather.shape[0]


# args = (x, weight, bias, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p, transposed)
def _call(args, grads) -> Call:
    x, weight, _, lora_A, lora_B, _, gather, _, _, dropout_p, _ = args
    return Call(x.device, x.dtype, _slots(x, gather), x.shape[1], lora_B.shape[1], lora_A.shape[1], dropout_p > 0.0,
                grads, torch.are_deterministic_algorithms_enabled(), experts=weight.shape[0])


def _kind_forward(plan, args, save):
    x, weight, bias, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p, transposed = args
    return backends.EXPERTS_FORWARD[plan.forward](x, weight, bias, lora_A, lora_B, offsets, gather, seed, scaling,
                                                  dropout_p, save, transposed, plan.aux)


def _kind_backward(plan, grad_y, args, saved, need_dx, deterministic):
    x, weight, _, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p, transposed = args
    return backends.EXPERTS_BACKWARD[plan.backward](grad_y, x, weight, lora_A, lora_B, saved[0], offsets, gather,
                                                    seed, scaling, dropout_p, need_dx, deterministic, transposed,
                                                    plan.aux)


def _kind_backward_op(grad_y, args, saved, need_dx, deterministic, spec):
    x, weight, _, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p, transposed = args
    return torch.ops.lora_kernels.experts_linear_bwd(grad_y, x, weight, lora_A, lora_B, saved[0], offsets, gather,
                                                     seed, scaling, dropout_p, transposed, need_dx, deterministic,
                                                     spec)


EXPERTS = entry.Kind("experts", "experts_linear_fwd", _kind_forward, _kind_backward, _kind_backward_op, _call,
                     n_args=11, tensors=(0, 1, 2, 3, 4, 5, 6, 7), trained=(3, 4), kept=(0, 1, 3, 4, 5, 6, 7))


@torch.library.custom_op("lora_kernels::experts_linear_fwd", mutates_args=())
def experts_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                       offsets: Tensor, gather: Optional[Tensor], seed: Optional[Tensor], scaling: float,
                       dropout_p: float, transposed: bool, grads: int, plan: str) -> tuple[Tensor, Tensor]:
    check_experts_args(x, weight, bias, lora_A, lora_B, offsets, gather, scaling, dropout_p, transposed)
    check_seed(seed, x.device, dropout_p)
    args = (x, weight, bias, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p, transposed)
    return _kind_forward(planner.resolve_spec(plan, _call(args, grads)), args, grads > 0)


@experts_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p, transposed, grads, plan):
    check_experts_args(x, weight, bias, lora_A, lora_B, offsets, gather, scaling, dropout_p, transposed)
    S, N, r = _slots(x, gather), lora_B.shape[1], lora_A.shape[1]
    return x.new_empty((S, N)), x.new_empty((S, r) if grads else (0,), dtype=_acc(x.dtype))


@torch.library.custom_op("lora_kernels::experts_linear_bwd", mutates_args=())
def experts_linear_bwd(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, xa: Tensor,
                       offsets: Tensor, gather: Optional[Tensor], seed: Optional[Tensor], scaling: float,
                       dropout_p: float, transposed: bool, need_dx: bool, deterministic: bool,
                       plan: str) -> tuple[Tensor, Tensor, Tensor]:
    S, N, r = _slots(x, gather), lora_B.shape[1], lora_A.shape[1]
    for name, t, shape in (("grad_y", grad_y, (S, N)), ("xa", xa, (S, r))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    check_seed(seed, x.device, dropout_p)
    args = (x, weight, None, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p, transposed)
    chosen = planner.resolve_spec(plan, _call(args, 2 if need_dx else 1))
    return _kind_backward(chosen, grad_y, args, (xa,), need_dx, deterministic)


@experts_linear_bwd.register_fake
def _(grad_y, x, weight, lora_A, lora_B, xa, offsets, gather, seed, scaling, dropout_p, transposed, need_dx,
      deterministic, plan):
    dx = torch.empty_like(x) if need_dx else x.new_empty((0,))
    return dx, torch.empty_like(lora_A), torch.empty_like(lora_B)


entry.register_op_autograd(experts_linear_fwd, EXPERTS)


def experts_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                   offsets: Tensor, scaling: float, dropout_p: float = 0.0, *, gather: Optional[Tensor] = None,
                   transposed: bool = False, backend: str = "auto", seed: Optional[Tensor] = None) -> Tensor:
    """LoRA on experts for slots sorted by expert: y [S, N] (see the module's docstring). r = 0 (lora_A [E, 0, K])
    runs the frozen grouped projection alone. The dropout mask is drawn per slot row."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    lora_A, lora_B = adapters_for(x, lora_A, lora_B)
    check_experts_args(x, weight, bias, lora_A, lora_B, offsets, gather, scaling, dropout_p, transposed)
    planner.check_name(backend)
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError(f"{'weight' if weight.requires_grad else 'bias'}: the experts' base parameters must be "
                         "frozen (requires_grad=False); LoRA trains lora_A and lora_B")
    scaling, dropout_p = float(scaling), float(dropout_p)
    seed = resolve_seed(seed, x, dropout_p)
    args = (x, weight, bias, lora_A, lora_B, offsets, gather, seed, scaling, dropout_p, bool(transposed))
    return entry.run(EXPERTS, args, (_slots(x, gather),), backend, grads_needed(x, lora_A, lora_B))


# --------------------------------------------------------------------------------------------
# transformers' experts modules
# --------------------------------------------------------------------------------------------
class ExpertAdapter(NamedTuple):
    """One projection's adapter over all experts: lora_A [E, r, K], lora_B [E, N, r] (views allowed)."""

    lora_A: Tensor
    lora_B: Tensor
    scaling: float
    dropout_p: float = 0.0


def projections(module) -> tuple[str, str]:
    """(up or gate+up projection, down projection) parameter names of a transformers experts module."""
    return ("gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"), "down_proj"


def is_experts_module(module) -> str | None:
    """Why `module` is not an experts module that ``experts_block`` serves (None: it is): transformers'
    ``use_experts_implementation`` classes (3-D projections, ``num_experts``, the gate or activation they define)."""
    gated = getattr(module, "has_gate", True)
    for attr in ("num_experts", "is_transposed", "has_bias", "_apply_gate" if gated else "act_fn"):
        if not hasattr(module, attr):
            return f"{type(module).__name__} is not a transformers experts module (no {attr})"
    up, down = projections(module)
    for name in (up, down):
        p = getattr(module, name, None)
        if not isinstance(p, Tensor) or p.dim() != 3 or p.shape[0] != module.num_experts:
            return f"{type(module).__name__}.{name} is not a [{module.num_experts}, ., .] parameter"
    if getattr(module, "_is_expert_parallel", False):
        return "expert parallelism (sentinel slots)"
    return None


def routing(top_k_index: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """(perm, offsets): the slots (token-major, k per token) sorted by expert, and each expert's end (int32), on the
    device without a host read."""
    expert_ids = top_k_index.reshape(-1)
    sorted_ids, perm = torch.sort(expert_ids, stable=True)
    bounds = torch.arange(num_experts, device=expert_ids.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds, right=True).to(torch.int32)
    return perm, offsets


def _project(module, name: str, x: Tensor, gather, offsets: Tensor, adapter: ExpertAdapter | None, backend: str):
    weight = getattr(module, name)
    bias = getattr(module, f"{name}_bias") if module.has_bias else None
    transposed = bool(module.is_transposed)
    if adapter is None:  # a projection without an adapter: the frozen grouped product (rank 0)
        E, (K, N) = weight.shape[0], expert_features(weight, transposed)
        adapter = ExpertAdapter(weight.new_zeros((E, 0, K)), weight.new_zeros((E, N, 0)), 0.0)
    return experts_linear(x, weight, bias, adapter.lora_A, adapter.lora_B, offsets, adapter.scaling,
                          adapter.dropout_p, gather=gather, transposed=transposed, backend=backend)


def experts_block(module, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                  adapters: dict[str, ExpertAdapter], backend: str = "auto") -> Tensor:
    """A transformers experts module's forward with LoRA on its projections (`adapters`: {parameter name: adapter};
    a projection without one runs frozen): slots sorted by expert, the up (gate+up) projection with x gathered in
    the kernel, the module's gate (``_apply_gate``: gpt-oss's clamped, interleaved one included) or activation, the
    down projection, an optional post-expert norm, routing weights, then each token's k slots summed."""
    T, H = hidden.shape
    k = top_k_index.shape[-1]
    perm, offsets = routing(top_k_index, module.num_experts)
    up, down = projections(module)
    x = hidden
    if autocast_dtype(x) is None and x.dtype != getattr(module, up).dtype:
        x = x.to(getattr(module, up).dtype)  # (transformers' grouped path casts the input to the experts' dtype)
    h = _project(module, up, x, perm // k, offsets, adapters.get(up), backend)
    h = module._apply_gate(h) if getattr(module, "has_gate", True) else module.act_fn(h)
    out = _project(module, down, h, None, offsets, adapters.get(down), backend)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
    return out[inverse].view(T, k, out.shape[-1]).sum(dim=1).to(hidden.dtype)


@functools.lru_cache(maxsize=None)
def _routing_names(cls) -> tuple[str, str, str]:
    """The names of an experts class's forward arguments: (hidden states, expert indices, routing weights)."""
    params = [p for p in inspect.signature(cls.forward).parameters if p != "self"]
    return tuple(params[:3]) if len(params) >= 3 else ("hidden_states", "top_k_index", "top_k_weights")


def routing_args(module, args: tuple, kwargs: dict) -> tuple | None:
    """(hidden, top_k_index, top_k_weights) from an experts module's call arguments, or None when the call has
    others."""
    names = _routing_names(type(module))
    values = list(args)
    for name in names[len(values):]:
        if name not in kwargs:
            return None
        values.append(kwargs[name])
    if len(values) != 3 or set(kwargs) - set(names[len(args):]):
        return None
    return tuple(values)
