"""Which variant fits which call (pure functions of the call), which families can run here, the static order of
preference (the defaults where nothing is measured), the candidates a measurement times, and the launch parameters."""

from __future__ import annotations

import functools

import torch

from .. import backends
from ..settings import settings
from .calls import (AUTO_FAMILIES, CUBLAS_MIN_ROWS, CUDA_MAX_RANK, DECODE_MAX_ROWS, FAMILIES, FUSED_MAX_RANK,
                    SPLIT_MIN_N, TRITON_MAX_RANK, BACKWARDS, EXPERTS_BACKWARDS, EXPERTS_FORWARDS, FORWARDS,
                    MIXED_BACKWARDS, MIXED_FORWARDS, Call, Plan,
                    bucket, padded_rank, parse_spec)

__all__ = ["forward_unfit", "backward_unfit", "family_of", "family_unavailable", "xa_split_target", "preferences",
           "candidates", "cuda_unavailable_without_build", "default_plan", "static_plan", "aux_kernels_for",
           "launch_splits", "sm_count", "device_index", "plan_unfit", "check_forced", "SPLITTING"]


# Experts' Triton tiles serve padded ranks up to this (the shrink's [BLOCK_M, r] accumulator; kernels/experts.py)
EXPERTS_MAX_RANK = 128


def kind_unfit(kind: str, name: str, call: Call, single: tuple, mixed_names: tuple, experts_names: tuple) -> str | None:
    """What forward and backward variants share: the name of the call's kind (single adapter, mixed batch or
    experts), the unfused variants fitting everything, the kernels' dtypes, fp32 through cuBLAS, the ranks the kernels
    serve. A reason, "" (fits, nothing more to check) or None (the variant's own checks decide)."""
    mixed = call.adapters > 0
    names, label = ((experts_names, "experts ") if call.experts else (mixed_names, "mixed-batch ") if mixed
                    else (single, ""))
    if name not in names:
        return f"{name!r} is not a {label}{kind} variant (those are {names})"
    if name in ("torch", "aten"):
        return ""
    if call.dtype not in backends.KERNEL_DTYPES:
        return f"it supports float16, bfloat16 and float32, not {call.dtype}"
    if name.startswith("triton_") and call.dtype == torch.float32 and not mixed:
        return "fp32 runs through cuBLAS (Triton's fp32 dots sum in sequence: less accurate): use 'aten'"
    if call.experts and padded_rank(call.r) > EXPERTS_MAX_RANK:
        return f"its tiles serve ranks up to {EXPERTS_MAX_RANK} (r = {call.r})"
    if name.startswith("triton_") and padded_rank(call.r) > TRITON_MAX_RANK:
        return f"its tiles serve ranks up to {TRITON_MAX_RANK} (r = {call.r})"
    if name.startswith("cuda") and call.r > CUDA_MAX_RANK:
        return f"the CUDA C++ kernels serve ranks up to {CUDA_MAX_RANK} (r = {call.r})"
    return None


def forward_unfit(name: str, call: Call) -> str | None:
    """Why forward variant `name` cannot run `call` (None: it can), from the call alone; the family's
    availability on this machine is ``family_unavailable``'s."""
    why = kind_unfit("forward", name, call, FORWARDS, MIXED_FORWARDS, EXPERTS_FORWARDS)
    if why is not None:
        return why or None
    if name.startswith("triton_"):
        if name == "triton_fused" and call.dropout and not call.dora:
            return "it runs without dropout (the mask would be drawn again by every column of programs)"
        if name == "triton_fused" and padded_rank(call.r) > FUSED_MAX_RANK:
            return f"it serves ranks up to {FUSED_MAX_RANK} (r = {call.r})"
        if name == "triton_sorted" and call.dropout:
            return "it runs without dropout (its rows are taken in adapter order, the mask follows row positions)"
        if name == "triton_quantized" and not call.quant:
            return "it reads a quantized base weight (QLoRA), and this call's is dense"
        if name == "triton_quantized" and call.dora:
            return "DoRA's passes around it need W0 itself (QDoRA dequantizes it for the call)"
        if name == "triton_quantized" and call.N * call.K >= 2**31:
            return f"it indexes W0 with 32-bit offsets (N K = {call.N * call.K} >= 2**31)"
        return None
    if name == "cuda_decode" and bucket(call.M) > DECODE_MAX_ROWS:
        return f"it serves up to {DECODE_MAX_ROWS} rows (M = {call.M})"
    return None


def backward_unfit(name: str, call: Call) -> str | None:
    """Why backward variant `name` cannot run `call` (None: it can)."""
    why = kind_unfit("backward", name, call, BACKWARDS, MIXED_BACKWARDS, EXPERTS_BACKWARDS)
    if why is not None:
        return why or None
    if name == "triton_fused" and call.grads == 1:
        return "it computes dX, and x needs no grad in this call"
    return None


def family_of(variant: str) -> str:
    return backends.FAMILY_OF[variant]


def family_unavailable(family: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a backend family cannot run tensors of `dtype` on `device` here (None: it can)."""
    if family == "aten":
        return None
    return backends.BACKENDS[family].unavailable_reason(device, dtype)


def xa_split_target(call: Call, sm_count: int) -> int:
    """Programs the thin xa kernel should reach by splitting K when its row x rank tiles are fewer (0: never):
    two per SM. Not in deterministic mode (the partial sums are added with atomics, in any order)."""
    return 0 if call.deterministic or sm_count <= 0 else 2 * sm_count


def preferences(call: Call) -> tuple[tuple, tuple]:
    """The static order of preference of the forward and backward variants for a call on a GPU: the best guesses
    from the H100 run (bench/results/h100-20261125, docs/design.md). Static defaults serve where nothing is measured:
    compiled graphs and CUDA graphs (little host time per call, so GPU time decides), deterministic mode,
    LORA_KERNELS_TUNE=off."""
    if call.dtype == torch.float64:
        return ("torch", "aten"), ("torch", "aten")
    if call.experts:  # fp32: the grouped ATen products; 16-bit: the grouped kernels (measured against aten on CUDA)
        order = ("aten", "triton_grouped") if call.dtype == torch.float32 else ("triton_grouped", "aten")
        return order + ("torch",), order + ("torch",)
    if call.adapters:  # fp32: cuBLAS's GEMM (Triton's fp32 dots sum in sequence)
        big = bucket(call.M) >= CUBLAS_MIN_ROWS or call.dtype == torch.float32
        fwd = ("triton_gated_cublas", "triton_gated") if big else ("triton_gated", "triton_gated_cublas")
        return fwd + ("triton_sorted", "torch"), ("triton_split", "torch")
    tail_f, tail_b = ("cuda_decode", "cuda_tiled", "torch"), ("cuda", "torch")
    if call.dtype == torch.float32:
        return ("aten",) + tail_f, ("aten",) + tail_b
    # A quantized W0 (QLoRA): at decode sizes the forward reads W0 in its quantized form (a quarter of the bytes,
    # which is what decode is bound by); above, the dequantized W0 goes through the dense order.
    quantized = ("triton_quantized",) if call.quant else ()
    if quantized and bucket(call.M) <= DECODE_MAX_ROWS:
        first, quantized = quantized, ()
    else:
        first = ()
    # 16-bit. Forward: cuBLAS for x W0^T from 2048 rows (Triton's GEMM reached 0.8x cuBLAS), below it the one-launch
    # kernel (M=16: at the cuBLAS floor; M=1024: 0.063 vs 0.071 ms for the composite), xa first with dropout.
    if bucket(call.M) >= CUBLAS_MIN_ROWS:
        fwd = first + ("triton_cublas", "triton_xa_first", "aten") + quantized
    else:
        fwd = first + ("triton_fused", "triton_xa_first", "triton_cublas", "aten") + quantized
    # Backward, from 2048 rows: eager's products beat the split kernel at N = 4096 (0.58 vs 0.88 ms at M=8192), split
    # won at N = 14336 (1.54 vs 1.67 ms). Below, where host time decides: the one-launch kernel (one launch and no
    # GEMM of ATen's: the least host time of all, bench.host --train).
    if bucket(call.M) < CUBLAS_MIN_ROWS:
        bwd = ("triton_fused", "triton_split", "aten") if call.grads == 2 else ("triton_split", "aten")
    elif call.N >= SPLIT_MIN_N:
        bwd = ("triton_split", "aten", "triton_fused")
    else:
        bwd = ("aten", "triton_split", "triton_fused")
    return fwd + tail_f, tuple(dict.fromkeys(bwd + ("triton_fused",))) + tail_b


def allowed(family: str, call: Call) -> tuple[tuple, tuple]:
    f, b, mf, mb, ef, eb = FAMILIES[family] if family != "auto" else union(AUTO_FAMILIES)
    return (ef, eb) if call.experts else (mf, mb) if call.adapters else (f, b)


@functools.lru_cache(maxsize=None)
def union(families: tuple) -> tuple:
    return tuple(tuple(dict.fromkeys(v for fam in families for v in FAMILIES[fam][i])) for i in range(6))


def candidates(call: Call, family: str = "auto") -> tuple[list, list, dict]:
    """(forward variants, backward variants, {variant: why not}) that can run `call` here, for `family` ("auto":
    every family measured on CUDA)."""
    if family != "auto":
        reason = family_unavailable(family, call.device, call.dtype)
        if reason:  # a family asked for by name runs its own kernels or refuses, never another family's
            return [], [], {family: reason}
    fwd_allowed, bwd_allowed = allowed(family, call)
    why = {}
    down = {}
    for fam in dict.fromkeys(family_of(v) for v in fwd_allowed + bwd_allowed):
        down[fam] = family_unavailable(fam, call.device, call.dtype) if fam != "cuda" or family != "auto" \
            else cuda_unavailable_without_build(call.device, call.dtype)
    fwds, bwds = [], []
    for names, unfit, out in ((fwd_allowed, forward_unfit, fwds), (bwd_allowed, backward_unfit, bwds)):
        for v in names:
            reason = down[family_of(v)] or unfit(v, call)
            if reason:
                why.setdefault(v, reason)
            else:
                out.append(v)
    return fwds, bwds, why


def cuda_unavailable_without_build(device, dtype) -> str | None:
    """`auto` considers the CUDA C++ kernels when the extension is already built (never a just-in-time build)."""
    from .. import cuda_ext

    if not cuda_ext.built():
        return "the CUDA C++ extension is not built (backend='cuda' builds it just in time in a source checkout)"
    return family_unavailable("cuda", device, dtype)


def default_plan(call: Call, family: str = "auto") -> Plan:
    """The static plan for a call: the first eligible variant of the static order of preference. On CPU `auto`
    runs the torch reference (the interpreter is a correctness tool, not a fast path)."""
    if family == "auto" and call.device.type != "cuda":
        family = "torch"
    fwds, bwds, why = candidates(call, family)
    pf, pb = preferences(call)
    fwd = next((v for v in pf if v in fwds), fwds[0] if fwds else None)
    bwd = next((v for v in pb if v in bwds), bwds[0] if bwds else None)
    if fwd is None or bwd is None:
        reasons = "; ".join(f"{v}: {r}" for v, r in why.items())
        raise backends.BackendUnavailableError(
            f"backend {family!r} cannot run {call.dtype} tensors on {call.device} for this call ({reasons})")
    return Plan(fwd, bwd, launch_splits(call, fwd))


def static_plan(call: Call) -> Plan:
    """What `auto` runs for `call` on a GPU where nothing is measured, whatever this machine has (benchmarks and
    reports made without a GPU): the first variants of the static order of preference that fit the call, the CUDA C++
    ones aside (they need the extension built). Launch parameters as on an H100 (132 SMs)."""
    pf, pb = preferences(call)
    fwd = next(v for v in pf if not v.startswith("cuda") and not forward_unfit(v, call))
    bwd = next(v for v in pb if v != "cuda" and not backward_unfit(v, call))
    splits = xa_split_target(call, 132) if fwd in SPLITTING else 0
    return Plan(fwd, bwd, splits)


def aux_kernels_for(backend: str, device: torch.device) -> bool:
    """Whether the auxiliary passes of calls under `backend` (the dropout mask of a dropped x, DoRA's weight norm,
    column scale and magnitude grad, QLoRA's dequantization) run as Triton kernels (``Plan.aux``): under the Triton
    and CUDA families, and `auto` on CUDA (whichever variant it picks, the aten composition included); a plan spec
    when one of its variants is theirs. The torch and aten families, forced by name, run the plain-PyTorch twins and
    never launch a kernel of another family. (Where Triton cannot run the tensors, the twins serve anyway:
    ``backends.triton_serves``.)"""
    if backend == "auto":
        backend = settings().forced or ("triton" if device.type == "cuda" else "torch")
    if backend in FAMILIES:
        return backend in ("triton", "cuda")
    spec = parse_spec(backend)
    return family_of(spec.forward) in ("triton", "cuda") or family_of(spec.backward) in ("triton", "cuda")


# the forward variants whose thin xa kernel may split K (triton_cublas stores a rounded copy of s xa, which needs the
# whole sum)
SPLITTING = ("triton_xa_first", "triton_quantized", "triton_gated", "triton_gated_cublas")


def launch_splits(call: Call, forward: str) -> int:
    if forward not in SPLITTING or call.device.type != "cuda":
        return 0
    return xa_split_target(call, sm_count(call.device))


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device_index(device)).multi_processor_count


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def plan_unfit(plan: Plan, call: Call) -> str | None:
    """Why `plan` cannot run `call` here (None: it can): a variant that does not fit the call, or whose family is
    unavailable on this machine now."""
    why = forward_unfit(plan.forward, call) or family_unavailable(family_of(plan.forward), call.device, call.dtype)
    if why:
        return f"forward {plan.forward!r} cannot run this call: {why}"
    if call.grads:
        why = backward_unfit(plan.backward, call) or family_unavailable(family_of(plan.backward), call.device,
                                                                       call.dtype)
        if why:
            return f"backward {plan.backward!r} cannot run this call: {why}"
    return None


def check_forced(plan: Plan, call: Call) -> Plan:
    """A plan the caller forced: raise BackendUnavailableError naming why it cannot run the call (before any kernel),
    else the plan."""
    why = plan_unfit(plan, call)
    if why:
        raise backends.BackendUnavailableError(f"backend {plan.spec!r}: {why}")
    return plan
