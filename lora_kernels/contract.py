"""The argument contract every kind of call shares, and the helpers around it (a leaf module: it imports nothing of
the package).

- ``check_args``: shapes, dtypes and devices of a LoRA call (x [..., K], W0 [N, K], bias [N], A [r, K], B [N, r]),
  raised before any kernel, naming the argument and the expected value; ``check_scaling`` / ``check_probability``
  / ``check_seed`` / ``check_index_tensor`` for the rest.
- torch.autocast's rule for linear layers (``autocast_dtype``, ``autocast_inputs``; torch gives custom ops none) and
  the adapters' dtype next to x (``adapters_for``, ``master_adapters``, ``like_x``).
- the dropout seed (``draw_seed``, ``resolve_seed``, ``seed_int``), which grads a call needs (``grads_needed``), and the
  flatten / unflatten of leading dims (``unflatten``); ``is_plain`` tells plain tensors from subclasses (DTensor,
  FakeTensor), which take the custom ops.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["check_args", "check_scaling", "check_probability", "check_seed", "check_index_tensor", "autocast_dtype",
           "autocast_inputs", "adapters_for", "master_adapters", "like_x", "draw_seed", "resolve_seed", "seed_int",
           "grads_needed", "is_plain", "check_tensors", "check_like_x", "PLAIN_TYPES", "unflatten", "SIXTEEN_BIT", "KERNEL_DTYPES",
           "ALL_DTYPES"]

SIXTEEN_BIT = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the kernels compute in
ALL_DTYPES = KERNEL_DTYPES + (torch.float64,)  # what the ops take (fp64: the reference and ATen formulas)


def master_adapters(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> bool:
    """Adapters kept in fp32 next to a 16-bit x (as PEFT keeps them): the ops take them as they are, compute as if
    they were rounded to x's dtype first, and return their grads in fp32 (no cast ops, no cast copies)."""
    return adapter_dtype == torch.float32 and x_dtype in SIXTEEN_BIT


def like_x(x, lora_A, lora_B):
    """Adapters in x's dtype: fp32 master adapters next to a 16-bit x are rounded to it (what the kernels do as they
    load them)."""
    if lora_A.dtype == x.dtype:
        return lora_A, lora_B
    return lora_A.to(x.dtype), lora_B.to(x.dtype)


def _fmt_dtype(dtypes):
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_args(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    """Raise a ValueError/TypeError naming the argument and the expected value; x is [..., K]. Any rank >= 1 is
    valid (the planner runs it on the variants that serve it)."""
    check_tensors(x, weight, bias, lora_A, lora_B)
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
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (N, r):
        raise ValueError(f"lora_B: expected shape [{N}, {r}] (out_features, r), got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias: expected shape [{N}], got {tuple(bias.shape)}")
    check_like_x(x, weight, bias, lora_A, lora_B)
    check_scaling("scaling", scaling)
    check_probability("dropout_p", dropout_p)


def check_tensors(x, weight, bias, lora_A, lora_B) -> None:
    """Tensors where tensors are expected (bias: or None), x of a dtype the ops take."""
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
    if x.dtype not in ALL_DTYPES:
        raise TypeError(f"x: unsupported dtype {x.dtype}; expected one of {_fmt_dtype(ALL_DTYPES)}")


def check_like_x(x, weight, bias, lora_A, lora_B) -> None:
    """The base tensors in x's dtype, the adapters too or fp32 masters of a 16-bit x (A and B alike), all on x's
    device."""
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is None:
            continue
        if t.dtype != x.dtype and not (name.startswith("lora") and master_adapters(x.dtype, t.dtype)):
            raise TypeError(f"{name}: dtype {t.dtype} does not match x's dtype {x.dtype}"
                            + (" (adapters may also be float32)" if x.dtype in SIXTEEN_BIT else "")
                            + "; cast one of them")
        if t.device != x.device:
            raise ValueError(f"{name}: on device {t.device}, expected x's device {x.device}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"lora_B: dtype {lora_B.dtype} does not match lora_A's dtype {lora_A.dtype}")


# While torch.compile traces, a float that differs between compiled layers (alpha / r, dropout) is symbolic and has
# no value to check: values are checked when the op runs (its implementation checks again, with plain numbers,
# before any kernel). Types are checked either way.
def check_scaling(name, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (
            not torch.compiler.is_compiling() and not math.isfinite(v)):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")


def check_probability(name, p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or (
            not torch.compiler.is_compiling() and not 0.0 <= p < 1.0):
        raise ValueError(f"{name}: expected a probability in [0, 1), got {p!r}")


def check_seed(seed, device, dropout_p) -> None:
    if dropout_p > 0.0:
        if seed is None or seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError("seed: dropout_p > 0 needs a one-element int64 tensor")
        if seed.device != device:
            raise ValueError(f"seed: on device {seed.device}, expected x's device {device}")


def check_index_tensor(name, t, shape, device) -> None:
    """An int32 / int64 tensor of this shape on this device (x's)."""
    if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got "
                        f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on device {t.device}, expected x's device {device}")


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


def draw_seed(device: torch.device) -> Tensor:
    """A dropout seed from torch's generator for `device` (so torch.manual_seed makes runs repeatable)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def resolve_seed(seed, x, dropout_p):
    """The dropout seed: the caller's, checked, or one drawn; None without dropout."""
    if dropout_p == 0.0:
        return None
    if seed is None:
        return draw_seed(x.device)
    check_seed(seed, x.device, dropout_p)
    return seed


def seed_int(seed):
    """The seed tensor's value as a Python int (one host read; the reference formulas' form)."""
    return None if seed is None else int(seed.reshape(()).item())


def grads_needed(x, *params) -> int:
    """Which grads a call needs, as the planner keys it: 2 when x needs a grad, 1 when only parameters (`params`:
    the call's other tensors, None allowed) do, 0 in inference (no grad mode, or nothing requires one)."""
    if not torch.is_grad_enabled():
        return 0
    if x.requires_grad:
        return 2
    return 1 if any(t is not None and t.requires_grad for t in params) else 0


PLAIN_TYPES = (Tensor, torch.nn.Parameter)  # tensors that may skip the custom-op dispatcher (no subclass)


def is_plain(*tensors) -> bool:
    """No tensor subclass among `tensors` (None allowed): such calls may skip the custom-op dispatcher."""
    return all(t is None or type(t) in PLAIN_TYPES for t in tensors)


def unflatten(y: Tensor, lead) -> Tensor:
    """y [M, N] as [*lead, N], like nn.Linear's output not marked as a view of another tensor: FSDP2 warns about
    modules returning views (an in-place op on one would bypass its backward hooks)."""
    return y if len(lead) == 1 else torch.ops.aten._unsafe_view(y, (*lead, y.shape[-1]))
