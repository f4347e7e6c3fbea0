"""The one path every kind of call takes from its public function to its kernels.

A kind (LoRA, a mixed batch, DoRA, QLoRA, QDoRA) is described once by a ``Kind``: its forward custom op, the functions that
run a plan's forward and backward on the op's own arguments, which of those arguments get grads, which the backward
keeps, and how the planner sees the call. ``run`` is then the same for every kind:

    grads needed -> the plan (cached or measured) -> custom op, eager autograd Function, or a direct call -> y

- under torch.compile, and for tensor subclasses (DTensor, FakeTensor), the kind's custom op: its implementation looks
  the plan up for its concrete shapes when it runs (never timing), and autograd is registered on it;
- otherwise, with grads, ``EagerCall``: the same forward and backward functions behind one autograd.Function, without
  the dispatcher's Python layers (less host time per call);
- in inference, the plan's forward directly: no autograd node at all.

The public functions (``lora_linear``, ``lora_linear_mixed``, ``dora_linear``, ``qlora_linear``, ``qdora_linear``) do
their kind's own preparation (autocast, argument checks, the seed, flattening x to [M, K]) and call ``run``.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import plan as planner
from .contract import PLAIN_TYPES, is_plain, unflatten

__all__ = ["Kind", "run", "EagerCall", "setup_context", "backward_grads", "register_op_autograd"]


class Kind:
    """One kind of call. ``args`` are its forward op's arguments without the trailing (grads, plan): x [M, K] first.

    forward(plan, args, save) -> (y, *saved): the plan's forward; `saved` are the products the backward reads
    backward(plan, grad_y, args, saved, need_dx, deterministic) -> (dx, *grads of args[trained])
    backward_op(grad_y, args, saved, need_dx, deterministic, spec) -> the same through the kind's backward op
    call(args, grads) -> plan.Call: how the planner keys the call (grads: 0 inference, 1 parameters, 2 and x)
    tensors: positions in args of tensors (or None, or lists of tensors: `lists`); the others are hyper-parameters
    trained: positions of the tensors whose grads the backward returns (after dx)
    kept: positions the backward reads
    bias / weight: positions of the base bias and weight (-1: none): the bias's grad is grad_y summed over rows;
    a weight that requires grad gets grad_y^T x (LoRA trains a frozen W0 only when a caller asks)
    """

    def __init__(self, name: str, op: str, forward: Callable, backward: Callable, backward_op: Callable,
                 call: Callable, *, n_args: int, tensors: tuple, trained: tuple, kept: tuple, lists: tuple = (),
                 bias: int = -1, weight: int = -1):
        self.name, self.op, self.forward, self.backward, self.backward_op, self.call = (
            name, op, forward, backward, backward_op, call)
        self.n_args, self.tensors, self.trained, self.lists, self.bias, self.weight = (
            n_args, tensors, trained, lists, bias, weight)
        self.kept_tensors = tuple(i for i in kept if i not in lists)
        self.hparams = tuple(i for i in range(n_args) if i not in tensors)

    def __repr__(self) -> str:
        return f"Kind({self.name!r})"


def _plain(args, positions) -> bool:
    """No tensor subclass (DTensor, FakeTensor) among the tensors of args (such calls take the custom op)."""
    for i in positions:
        t = args[i]
        if t is None or type(t) in PLAIN_TYPES:
            continue
        if type(t) is list and is_plain(*t):
            continue
        return False
    return True


def run(kind: Kind, args: tuple, lead, backend: str, grads: int):
    """y of one call of `kind` on `args` (x flattened to [M, K]) as [*lead, N]; `grads` from
    ``contract.grads_needed`` (what the backward will need, which the plan is chosen for)."""
    if torch.compiler.is_compiling() or not _plain(args, kind.tensors):
        # the op looks the plan up (cached or static, never timed) for its concrete shapes when it runs
        y = getattr(torch.ops.lora_kernels, kind.op)(*args, grads, backend)[0]
    else:
        plan = planner.choose(kind.call(args, grads), backend)
        if grads:
            y = EagerCall.apply(kind, plan, *args)
        else:  # inference: no autograd node at all
            y = kind.forward(plan, args, False)[0]
    return unflatten(y, lead)


def setup_context(ctx, kind: Kind, args: tuple, saved: tuple, spec, lists_on_ctx: bool = False) -> None:
    """Keep what the backward reads: the kept arguments and the forward's products, and the hyper-parameters. Lists
    of tensors (QLoRA's quantization state: the layer's own tensors) are flattened into the saved tensors under the
    custom op (what torch.compile traces), and ride on the context as they are with `lists_on_ctx` (the eager
    Function)."""
    kept = [args[i] for i in kind.kept_tensors]
    ctx.list_lengths = None
    if kind.lists:
        lists = [args[i] for i in kind.lists]
        if lists_on_ctx:
            ctx.lists = lists
        else:
            ctx.list_lengths = [len(a) for a in lists]
            kept += [t for a in lists for t in a]
    ctx.save_for_backward(*kept, *saved)
    ctx.kind, ctx.spec = kind, spec
    ctx.hparams = [args[i] for i in kind.hparams]
    ctx.has_bias = kind.bias >= 0 and args[kind.bias] is not None


def _restore(ctx) -> tuple[list, tuple]:
    """(args with the kept ones and the hyper-parameters restored, None elsewhere; the saved products)."""
    kind, flat = ctx.kind, ctx.saved_tensors
    args = [None] * kind.n_args
    for i, v in zip(kind.hparams, ctx.hparams):
        args[i] = v
    for i, t in zip(kind.kept_tensors, flat):
        args[i] = t
    pos = len(kind.kept_tensors)
    if ctx.list_lengths is not None:
        for i, n in zip(kind.lists, ctx.list_lengths):
            args[i] = list(flat[pos:pos + n])
            pos += n
    elif kind.lists:
        for i, a in zip(kind.lists, ctx.lists):
            args[i] = a
    return args, flat[pos:]


def backward_grads(ctx, grad_y, needs, through_op: bool) -> list:
    """The grads of every argument of the kind's forward (None where none is needed): the kind's backward (its op
    under the custom-op route) for x and the trained tensors, grad_y summed for the bias, grad_y^T x for a weight
    that requires one."""
    kind = ctx.kind
    args, saved = _restore(ctx)
    out = [None] * kind.n_args
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
        setup_context(ctx, kind, args, saved, plan, lists_on_ctx=True)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return None, None, *backward_grads(ctx, grad_y, ctx.needs_input_grad[2:], through_op=False)


def register_op_autograd(op, kind: Kind) -> None:
    """Autograd of a kind's forward custom op (inputs: args, grads, plan; outputs: y, *saved), through the kind's
    backward op."""

    def setup(ctx, inputs, output):
        setup_context(ctx, kind, tuple(inputs[:-2]), tuple(output[1:]), inputs[-1])

    def backward(ctx, grad_y, *unused):
        grads = backward_grads(ctx, grad_y, ctx.needs_input_grad[:-2], through_op=True)
        for i, n in zip(kind.lists, ctx.list_lengths or ()):  # an input list of tensors takes a list of grads
            grads[i] = [None] * n
        return *grads, None, None

    op.register_autograd(backward, setup_context=setup)
