"""The one path every kind of call takes from its public function to its kernels.

A kind (LoRA, a mixed batch, DoRA, QLoRA) is described once by a ``Kind``: its forward custom op, the functions that
run a plan's forward and backward on the op's own arguments, which of those arguments get grads, which the backward
keeps, and how the planner sees the call. ``run`` is then the same for every kind:

    grads needed -> the plan (cached or measured) -> custom op, eager autograd Function, or a direct call -> y

- under torch.compile, and for tensor subclasses (DTensor, FakeTensor), the kind's custom op: its implementation looks
  the plan up for its concrete shapes when it runs (never timing), and autograd is registered on it;
- otherwise, with grads, ``EagerCall``: the same forward and backward functions behind one autograd.Function, without
  the dispatcher's Python layers (less host time per call);
- in inference, the plan's forward directly: no autograd node at all.

The public functions (``lora_linear``, ``lora_linear_mixed``, ``dora_linear``, ``qlora_linear``) do their kind's own
preparation (autocast, argument checks, the seed, flattening x to [M, K]) and call ``run``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from . import plan as planner
from .contract import is_plain, unflatten

__all__ = ["Kind", "run", "EagerCall", "setup_context", "backward_grads", "register"]


class Kind(NamedTuple):
    """One kind of call. ``args`` are its forward op's arguments without the trailing (grads, plan): x [M, K] first.

    forward(plan, args, save) -> (y, *saved): the plan's forward; `saved` are the products the backward reads
    backward(plan, grad_y, args, saved, need_dx, deterministic) -> (dx, *grads of args[trained])
    backward_op(grad_y, args, saved, need_dx, deterministic, spec) -> the same through the kind's backward op
    call(args, grads) -> plan.Call: how the planner keys the call (grads: 0 inference, 1 parameters, 2 and x)
    trained: positions in args of the tensors whose grads the backward returns (after dx)
    kept: positions in args the backward reads (tensors, None, or lists of tensors)
    bias / weight: positions of the base bias and weight (-1: none): the bias's grad is grad_y summed over rows;
    a weight that requires grad gets grad_y^T x (LoRA trains a frozen W0 only when a caller asks)
    """

    name: str
    op: str
    forward: Callable
    backward: Callable
    backward_op: Callable
    call: Callable
    trained: tuple
    kept: tuple
    bias: int = -1
    weight: int = -1


_KINDS: dict = {}


def register(kind: Kind) -> Kind:
    _KINDS[kind.name] = kind
    return kind


def run(kind: Kind, args: tuple, lead, backend: str, grads: int):
    """y of one call of `kind` on `args` (x flattened to [M, K]) as [*lead, N]; `grads` from
    ``contract.grads_needed`` (what the backward will need, which the plan is chosen for)."""
    if torch.compiler.is_compiling() or not is_plain(*_tensors(args)):
        # the op looks the plan up (cached or static, never timed) for its concrete shapes when it runs
        y = getattr(torch.ops.lora_kernels, kind.op)(*args, grads, backend)[0]
    else:
        plan = planner.choose(kind.call(args, grads), backend)
        if grads:
            y = EagerCall.apply(kind, plan, *args)
        else:  # inference: no autograd node at all
            y = kind.forward(plan, args, False)[0]
    return unflatten(y, lead)


def _tensors(args):
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))
        elif isinstance(a, torch.Tensor):
            yield a


def setup_context(ctx, kind: Kind, args: tuple, saved: tuple, spec, lists_on_ctx: bool = False) -> None:
    """Keep what the backward reads: the kept arguments and the forward's products. Lists of tensors (QLoRA's
    quantization state: the layer's own tensors) are flattened into the saved tensors under the custom op (what
    torch.compile traces), and ride on the context as they are with `lists_on_ctx` (the eager Function)."""
    flat, layout, lists = [], [], {}
    for i in kind.kept:
        a = args[i]
        if isinstance(a, (list, tuple)) and not lists_on_ctx:
            layout.append(len(a))
            flat.extend(a)
        elif isinstance(a, (list, tuple)):
            layout.append(None)
            lists[i] = a
        else:
            layout.append(-1)
            flat.append(a)
    ctx.save_for_backward(*flat, *saved)
    ctx.kind, ctx.layout, ctx.spec, ctx.lists = kind, layout, spec, lists
    ctx.static = {i: a for i, a in enumerate(args) if i not in kind.kept and not isinstance(a, torch.Tensor)}
    ctx.n_args = len(args)
    ctx.has_bias = kind.bias >= 0 and args[kind.bias] is not None


def _restore(ctx) -> tuple[list, tuple]:
    """(args with the kept ones restored, None elsewhere but for the non-tensor ones, saved products)."""
    flat = ctx.saved_tensors
    args = [ctx.static.get(i) for i in range(ctx.n_args)]
    pos = 0
    for i, n in zip(ctx.kind.kept, ctx.layout):
        if n is None:
            args[i] = ctx.lists[i]
        elif n < 0:
            args[i] = flat[pos]
            pos += 1
        else:
            args[i] = list(flat[pos:pos + n])
            pos += n
    return args, flat[pos:]


def backward_grads(ctx, grad_y, needs, through_op: bool) -> list:
    """The grads of every argument of the kind's forward (None where none is needed): the kind's backward (its op
    under the custom-op route) for x and the trained tensors, grad_y summed for the bias, grad_y^T x for a weight
    that requires one."""
    kind = ctx.kind
    args, saved = _restore(ctx)
    out = [None] * ctx.n_args
    need_x = needs[0]
    if need_x or any(needs[i] for i in kind.trained):
        deterministic = torch.are_deterministic_algorithms_enabled()
        if through_op:
            dx, *grads = kind.backward_op(grad_y, args, saved, need_x, deterministic, ctx.spec)
        else:
            dx, *grads = kind.backward(ctx.spec, grad_y, args, saved, need_x, deterministic)
        out[0] = dx if need_x else None
        for i, g in zip(kind.trained, grads):
            out[i] = g if needs[i] else None
    if kind.bias >= 0 and needs[kind.bias] and ctx.has_bias:
        out[kind.bias] = grad_y.sum(0)
    if kind.weight >= 0 and needs[kind.weight]:  # W0 is frozen in LoRA; computed for callers that train it anyway
        out[kind.weight] = grad_y.t() @ args[0]
    return out


class EagerCall(torch.autograd.Function):
    """Every kind's forward and backward without the custom-op dispatcher, running a Plan: same checks, same
    results as the ops, less host time (the dispatcher's Python layers cost more than a small layer's kernels)."""

    @staticmethod
    def forward(ctx, kind, plan, *args):
        y, *saved = kind.forward(plan, args, True)
        setup_context(ctx, kind, args, tuple(saved), plan, lists_on_ctx=True)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return None, None, *backward_grads(ctx, grad_y, ctx.needs_input_grad[2:], through_op=False)


def register_op_autograd(op, kind: Kind) -> None:
    """Autograd of a kind's forward custom op (inputs: args, grads, plan; outputs: y, *saved), through the kind's
    backward op."""

    def setup(ctx, inputs, output):
        setup_context(ctx, kind, tuple(inputs[:-2]), tuple(output[1:]), inputs[-1])
        ctx.tensor_lists = {i: len(a) for i, a in enumerate(inputs[:-2])
                            if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a)}

    def backward(ctx, grad_y, *unused):
        grads = backward_grads(ctx, grad_y, ctx.needs_input_grad[:-2], through_op=True)
        for i, n in ctx.tensor_lists.items():  # an input list of tensors takes a list of grads
            grads[i] = [None] * n
        return *grads, None, None

    op.register_autograd(backward, setup_context=setup)
