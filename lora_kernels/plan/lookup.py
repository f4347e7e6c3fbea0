"""Choosing a call's plan: the memo (one dictionary access when warm), then a forced choice, the disk cache (checked
against what runs now), a measurement, or the static default. Cold lookups run one at a time."""

from __future__ import annotations

import threading

import torch

from .. import backends
from .. import settings as settings_module
from ..settings import settings
from . import cache
from .cache import cache_for, entry_key
from .calls import NAMES, Call, Plan, bucket, parse_spec
from .measure import tune_call
from .rules import aux_kernels_for, check_forced, default_plan, family_unavailable, plan_unfit

__all__ = ["memo_key", "why_not_measure", "choose", "choose_uncached", "resolve_spec", "tune", "reset"]


_MEMO: dict = {}
# Cold lookups (a key not in the memo: cache read, measuring) run one at a time: two threads never time the same new
# key at once, and the memo is written under it. Warm lookups read the memo without it.
_CHOOSE_LOCK = threading.RLock()


def memo_key(backend: str, call: Call) -> tuple:
    """The memo's key of a call: everything about it, rows rounded to their bucket."""
    return (backend, call.device, call.dtype, bucket(call.M), call.K, call.N, call.r, call.dropout, call.grads,
            call.deterministic, call.adapters, call.quant, call.dora, call.experts)


def why_not_measure(call: Call) -> str | None:
    """Why the plan for `call` is not timed now (None: it may be)."""
    if settings().tune != "on":
        return f"LORA_KERNELS_TUNE={settings().tune}"
    if call.device.type != "cuda":
        return "not a CUDA device"
    if backends.triton_interpreting():
        return "Triton's interpreter"
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    if call.deterministic:
        return "deterministic mode (a fixed choice)"
    return None


def choose(call: Call, backend: str = "auto", measure: bool = True, timer=None) -> Plan:
    """The plan for `call` under `backend` ('auto', a family, or a plan spec). Kept in memory per (backend, key), so
    a warm call costs one dictionary lookup. `measure=False`: the cached entry or the static default."""
    key = memo_key(backend, call)
    plan = _MEMO.get(key)
    if plan is not None:
        return plan
    with _CHOOSE_LOCK:
        plan = _MEMO.get(key)  # another thread may have chosen it meanwhile
        if plan is None:
            plan, final = choose_uncached(call, backend, measure, timer)
            plan = plan._replace(aux=aux_kernels_for(backend, call.device))
            if final:
                _MEMO[key] = plan
    return plan


def choose_uncached(call: Call, backend: str, measure: bool, timer) -> tuple[Plan, bool]:
    """(plan, whether it is final for this key: not a default served only because measuring was not allowed now)."""
    if backend == "auto" and settings().forced:
        backend = settings().forced
    if backend not in NAMES:
        return check_forced(parse_spec(backend), call), True
    if call.adapters and backend == "cuda":
        backends.warn_once("cuda-mixed", "lora_kernels: the CUDA C++ backend has no mixed-batch kernels; mixed "
                                         "batches run the Triton kernels")
    if call.experts and backend == "cuda":
        backends.warn_once("cuda-experts", "lora_kernels: the CUDA C++ backend has no experts kernels; experts run "
                                           "the Triton kernels")
    if backend == "auto" and call.device.type == "cuda":
        why = family_unavailable("triton", call.device, call.dtype)
        if why and call.dtype in backends.KERNEL_DTYPES:
            backends.warn_once(f"fallback-{call.device}-{call.dtype}",
                               f"lora_kernels: the Triton kernels cannot run {call.dtype} on {call.device} ({why}); "
                               "`auto` runs the unfused ATen composition there. `python -m lora_kernels.info` shows "
                               "the backends.")
    if call.M == 0:
        return default_plan(call, backend), True
    tune = settings().tune
    if tune == "off":
        return default_plan(call, backend), True
    key = entry_key(backend, call)
    entry = cache_for(call.device).entries.get(key)
    if entry is not None:
        cached = parse_spec(entry["plan"])
        why = plan_unfit(cached, call)
        if why is None:
            return cached, True
        backends.warn_once(f"stale-{key}", f"lora_kernels: the cached plan {cached.spec} for {key} cannot run here "
                                           f"now ({why}); chosen again")
    blocked = why_not_measure(call) if measure else "measuring not asked for"
    if blocked is None:
        return tune_call(call, backend, timer)[0], True
    permanent = tune != "on" or call.device.type != "cuda" or call.deterministic or backends.triton_interpreting()
    return default_plan(call, backend), permanent


def resolve_spec(spec: str, call: Call) -> Plan:
    """What an op runs for its `plan` argument ('auto', a family or a plan spec) on a concrete call: the cached or
    static plan, checked, never timed (graphs traced by torch.compile, direct op calls)."""
    return choose(call, spec, measure=False)


def tune(call: Call, backend: str = "auto", timer=None) -> tuple[Plan, dict]:
    """Measure `call` now, whatever the device (``python -m lora_kernels.tune``; tests on CPU with their own timer),
    and keep the result; the memory memo of that key is replaced."""
    with _CHOOSE_LOCK:
        plan, us = tune_call(call, backend, timer)
        _MEMO.pop(memo_key(backend, call), None)
    return plan, us


def reset() -> None:
    """Read the environment again and forget every plan in memory (the disk cache stays)."""
    with _CHOOSE_LOCK:
        _MEMO.clear()
        cache.clear()
        backends.reset_warnings()
        settings_module.reload()
