"""Host-side preparation of mixed batches, cached so that a served model pays it once, not per layer and call.

A mixed batch needs the adapters stacked along the rank (``ops.stack_adapters``: a copy of every adapter) and the
adapter ids checked (a read of the ids: one host sync) and converted to the kernels' int32. Done naively, each layer
of each forward copies all its adapters (32 adapters of r = 16 at K = N = 4096: 8 MiB read and written, a third of
W0's bytes, before the kernel reads them again) and waits for the GPU once. Here:

- ``AdapterStack`` keeps one layer's stacked copy while no grad is needed (inference), rebuilt when any adapter
  changes: another tensor, new storage (``.to()``), or an in-place write (optimizer step, ``load_state_dict``,
  ``merge``: torch's version counter). With grads, adapters are stacked every call (autograd splits the stacked
  grads back to each adapter); only the rank owners are reused.
- ``checked_ids`` keeps the last batch's checked, flattened int32 ids, keyed on the caller's ids tensor (same object,
  same version, same shape): with ``with adapter_ids(ids):`` every layer of the model gets the same tensor, so the
  first layer checks and the others reuse it.

Kept copies are built outside inference mode even when the call is inside it (a server's usual mode): an
inference tensor could not be saved for a later backward (frozen adapters, input grads wanted), and the copy
outlives the call. Neither cache is used while torch.compile traces (the graph stacks and converts; its guards handle
reuse), for tensor
subclasses (DTensor, FakeTensor) or inference-mode tensors (no version counter): those take the plain path.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch import Tensor

from .contract import check_index_tensor, is_plain
from .ops import check_mixed_values, stack_adapters

__all__ = ["AdapterStack", "checked_ids", "rank_owner", "expand_ids", "adapter_ids", "current_adapter_ids"]

def _trackable(t: Tensor) -> bool:
    """A plain tensor (the ops' own test) with a version counter (inference-mode tensors have none)."""
    return is_plain(t) and not t.is_inference()


def _fingerprint(t: Tensor):
    """What must be unchanged for a copy of `t` to be current, besides its identity (compared through a weak
    reference). Assigning ``.data`` (``module.to()``) changes the storage, not the version."""
    return t._version, t.data_ptr(), t.shape, t.dtype


def _same(entries, tensors) -> bool:
    if len(entries) != len(tensors):
        return False
    for (ref, fingerprint), t in zip(entries, tensors):
        if ref() is not t or fingerprint != _fingerprint(t):
            return False
    return True


_OWNERS: dict = {}


def rank_owner(ranks: tuple, device: torch.device) -> Tensor:
    """int32 [sum(ranks)]: the adapter index of each stacked rank column, one tensor per (ranks, device)."""
    key = (ranks, device)
    owner = _OWNERS.get(key)
    if owner is None:
        owner = torch.repeat_interleave(torch.arange(len(ranks), dtype=torch.int32),
                                        torch.tensor(ranks)).to(device)
        if len(_OWNERS) >= 256:
            _OWNERS.clear()
        _OWNERS[key] = owner
    return owner


class AdapterStack:
    """One layer's adapters stacked along the rank: (lora_A [R, K], lora_B [N, R], rank_owner [R] int32)."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        """Drop the cached copy (it holds as many bytes as the adapters themselves)."""
        self._cache = None  # (entries, stacked): one attribute, replaced whole (threads see one or the other)

    def __getstate__(self):  # pickling or deep-copying a layer never carries the copy (or its weak references)
        return {}

    def __setstate__(self, state):
        self.clear()

    def get(self, lora_As, lora_Bs, dtype: torch.dtype | None = None):
        """The stacked tensors of these adapters (cast to `dtype` if given: PEFT may keep adapters in fp32)."""
        tensors = (*lora_As, *lora_Bs)
        if torch.compiler.is_compiling():
            return self._stack(lora_As, lora_Bs, dtype, cached_owner=False)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return self._stack(lora_As, lora_Bs, dtype, cached_owner=all(_trackable(t) for t in tensors))
        cache = self._cache
        if cache is not None and cache[1][0].dtype == (dtype or lora_As[0].dtype) and _same(cache[0], tensors):
            return cache[1]  # the same tensors, unchanged (so still trackable)
        self.clear()  # free the old copy before making the new one
        if not all(_trackable(t) for t in tensors):
            return self._stack(lora_As, lora_Bs, dtype, cached_owner=False)
        with torch.no_grad(), torch.inference_mode(False):  # kept copies are normal tensors (module docstring)
            stacked = self._stack(lora_As, lora_Bs, dtype, cached_owner=True)
        self._cache = (tuple((weakref.ref(t), _fingerprint(t)) for t in tensors), stacked)
        return stacked

    def cast(self, lora_A: Tensor, lora_B: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """One adapter in `dtype` (kept in another, e.g. fp32 next to a 16-bit base weight): differentiably while
        grads are needed (they reach the parameters in their own dtype), else a cast copy kept until the adapter
        changes, so inference pays the cast once."""
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (lora_A.requires_grad or
                                                                         lora_B.requires_grad)):
            return lora_A.to(dtype), lora_B.to(dtype)
        return self.get([lora_A], [lora_B], dtype)[:2]

    @staticmethod
    def _stack(lora_As, lora_Bs, dtype, cached_owner: bool):
        if dtype is not None:
            lora_As = [a.to(dtype) for a in lora_As]
            lora_Bs = [b.to(dtype) for b in lora_Bs]
        if not cached_owner:
            return stack_adapters(lora_As, lora_Bs)
        owner = rank_owner(tuple(a.shape[0] for a in lora_As), lora_As[0].device)
        if len(lora_As) == 1:
            return lora_As[0], lora_Bs[0], owner
        return torch.cat(list(lora_As), 0), torch.cat(list(lora_Bs), 1), owner


# (weak reference to the caller's ids, key, checked flat int32 ids): one tuple, replaced whole (no torn reads)
_LAST_IDS: tuple = (None, None, None)


def checked_ids(ids: Tensor, expanded: Tensor, n_adapters: int, device: torch.device) -> Tensor:
    """`expanded` (the caller's `ids` broadcast to the input's leading dims) flattened, int32, contiguous, checked:
    an integer tensor on `device` (x's), every value in [-1, n_adapters). Reused while the caller passes the same
    unchanged ids tensor with the same input shape and adapter count (a check reads the ids: one host sync)."""
    global _LAST_IDS
    check_index_tensor("adapter_ids", expanded, expanded.shape, device)
    if torch.compiler.is_compiling() or not _trackable(ids):
        check_mixed_values(expanded, None, n_adapters)
        return expanded.reshape(-1)
    key = (_fingerprint(ids), expanded.shape, n_adapters)
    ref, last_key, flat = _LAST_IDS
    if ref is not None and ref() is ids and last_key == key:
        return flat
    with torch.inference_mode(False):  # a kept copy is a normal tensor (module docstring)
        flat = expanded.reshape(-1).to(torch.int32).contiguous()
    capturing = flat.is_cuda and torch.cuda.is_current_stream_capturing()
    check_mixed_values(flat, None, n_adapters)  # skipped during CUDA graph capture (no sync allowed there)...
    if not capturing:  # ...so only a checked batch is remembered
        _LAST_IDS = (weakref.ref(ids), key, flat)
    return flat


def expand_ids(ids: Tensor, lead: torch.Size) -> Tensor:
    """The ids of a mixed batch for x's leading dims `lead`: one per row, or a prefix of them broadcast."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"adapter_ids: expected an integer tensor, got {type(ids).__name__}")
    if ids.dim() > len(lead) or tuple(ids.shape) != tuple(lead[: ids.dim()]):
        raise ValueError(f"adapter_ids: expected shape {list(lead)} (one id per row) or a prefix of it (one per "
                         f"sequence), got {list(ids.shape)}")
    return ids.reshape(tuple(ids.shape) + (1,) * (len(lead) - ids.dim())).expand(lead)  # (0-d for a 1-D x)


# The ids of the enclosing `with adapter_ids(...)` block, per thread: a threaded server serves different batches
# through one model at once. torch.compile cannot read thread-local state (it would bake in the value seen while
# tracing) nor trace ContextVar.get, so compiled code reads a module global instead (dynamo guards on it): the
# ids of the one thread inside a block, or a marker that refuses the call while blocks of several threads overlap.
_LOCAL = threading.local()
_HELD: dict = {}  # thread ident -> that thread's innermost ids
_HELD_LOCK = threading.Lock()
_SEVERAL = object()
_COMPILED_VIEW = None


def _publish() -> None:
    global _COMPILED_VIEW
    held = list(_HELD.values())
    _COMPILED_VIEW = held[0] if len(held) == 1 else (None if not held else _SEVERAL)


@contextlib.contextmanager
def adapter_ids(ids: Tensor):
    """Within the block, every FusedLoRALinear that is called without ``adapter_ids=`` serves a mixed batch:
    ``ids`` gives each row's adapter (an index into the layer's ``adapter_names``, -1 for the base layer alone),
    per token (shape = the input's leading dims) or per sequence (a prefix of them, broadcast over the rest).
    This is how a whole model from ``inject`` serves requests for different adapters in one forward. The block
    holds for the calling thread only; under torch.compile, pass ``adapter_ids=`` to the layers' forward where
    several threads serve at once."""
    outer = getattr(_LOCAL, "ids", None)
    me = threading.get_ident()
    _LOCAL.ids = ids
    with _HELD_LOCK:
        _HELD[me] = ids
        _publish()
    try:
        yield
    finally:
        _LOCAL.ids = outer
        with _HELD_LOCK:
            if outer is None:
                _HELD.pop(me, None)
            else:
                _HELD[me] = outer
            _publish()


def current_adapter_ids():
    """The ids of this thread's enclosing ``adapter_ids`` block, or None."""
    if torch.compiler.is_compiling():
        if _COMPILED_VIEW is _SEVERAL:
            raise RuntimeError("adapter_ids: blocks of several threads overlap, and compiled code cannot tell "
                               "threads apart; under torch.compile pass adapter_ids= to the forward instead")
        return _COMPILED_VIEW
    return getattr(_LOCAL, "ids", None)
