"""Every per-call kernel choice in one place: what a call is (``Call``), what runs it (``Plan``), how it is chosen.

A call is described by its device, dtype, rows M, K, N, rank (a mixed batch: the adapters' stacked rank and their
number), dropout on/off, which grads it needs, and torch's deterministic mode. A plan names the forward and the
backward *variant* that run it (``FORWARDS`` / ``BACKWARDS``; mixed batches ``MIXED_FORWARDS`` /
``MIXED_BACKWARDS``) and the launch parameters they need. Launchers take the variant as an argument and decide
nothing; the run-time environment variables are read here and nowhere else.

How a plan is chosen (``choose``), as cuDNN's benchmark mode and Triton's autotuner do it:

1. a forced choice: ``backend=`` (a backend family, or a plan spec such as ``"triton_fused+aten"``) or
   LORA_KERNELS_BACKEND; a forced plan that cannot run the call raises before any kernel, naming why;
2. the cache: in memory, and on disk (JSON, one file per GPU model and software versions, ``cache_path``);
3. on CUDA, the first call of a new key times every eligible candidate on scratch inputs of that shape (fresh
   tensors from a private generator: the caller's tensors and torch's random stream are untouched) with CUDA events
   around back-to-back calls after a warm-up, so host launch cost counts as the user pays it, and keeps the
   fastest. The candidates always include ``aten``, which computes every product with ATen (cuBLAS) as PEFT's eager
   layer does: the chosen plan is never slower than that composition beyond timing noise;
4. otherwise the static defaults (``default_plan``): the best guesses from the H100 measurements (docs/design.md).

Nothing is timed while torch.compile traces or in what it compiled (the ops hold the backend name and look the cached
or default plan up for their concrete shapes when they run), during CUDA graph capture, in deterministic mode (a fixed
choice), under Triton's interpreter or on CPU. As with
``torch.backends.cudnn.benchmark``, a measured choice can differ between runs and machines (results then differ in
the last bits); ``LORA_KERNELS_TUNE=off`` uses the static defaults only (and Triton's first config per kernel) for
bitwise-repeatable runs.

Knobs (read once per process; ``reset()`` reads them again):
    LORA_KERNELS_BACKEND    force a backend family (torch, aten, triton, cuda) or a plan spec for backend="auto"
    LORA_KERNELS_TUNE       on (default: measure new keys on CUDA) | cached (use the cache, never measure) | off
    LORA_KERNELS_CACHE_DIR  where the plan cache lives (default: $XDG_CACHE_HOME/lora_kernels, ~/.cache/...)
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import warnings
from typing import Callable, NamedTuple

import torch

from . import backends

__all__ = ["Call", "Plan", "choose", "default_plan", "tune", "parse_spec", "cache_path", "describe", "reset",
           "FORWARDS", "BACKWARDS", "MIXED_FORWARDS", "MIXED_BACKWARDS", "FAMILIES"]

# --------------------------------------------------------------------------------------------------------------
# Variants and families
# --------------------------------------------------------------------------------------------------------------
FORWARDS = ("torch", "aten", "triton_fused", "triton_xa_first", "triton_cublas", "triton_quantized", "cuda_tiled",
            "cuda_decode")
BACKWARDS = ("torch", "aten", "triton_split", "triton_fused", "cuda")
MIXED_FORWARDS = ("torch", "triton_gated", "triton_gated_cublas", "triton_sorted")
MIXED_BACKWARDS = ("torch", "triton_split")

# The variants each backend family may run: (forwards, backwards, mixed forwards, mixed backwards). `aten` (every
# product by ATen, the package's dropout mask) belongs to the Triton family too: it is how that family serves fp32
# (Triton's fp32 dots sum in sequence, less accurate than cuBLAS). The CUDA C++ kernels have no mixed-batch kernels:
# that family runs the Triton ones there; `aten` runs the reference's per-adapter formulas.
FAMILIES = {
    "torch": (("torch",), ("torch",), ("torch",), ("torch",)),
    "aten": (("aten",), ("aten",), ("torch",), ("torch",)),
    "triton": (("triton_fused", "triton_xa_first", "triton_cublas", "triton_quantized", "aten"),
               ("triton_split", "triton_fused", "aten"),
               ("triton_gated", "triton_gated_cublas", "triton_sorted"), ("triton_split",)),
    "cuda": (("cuda_decode", "cuda_tiled"), ("cuda",), ("triton_gated", "triton_gated_cublas", "triton_sorted"),
             ("triton_split",)),
}
AUTO_FAMILIES = ("aten", "triton", "cuda")  # what `auto` measures on CUDA (torch is the reference, never faster)
NAMES = ("auto", *FAMILIES)

SIXTEEN_BIT = (torch.float16, torch.bfloat16)
CUBLAS_MIN_ROWS = 2048  # rows from which the Triton forward leaves x W0^T to cuBLAS (H100: see docs/design.md)
SPLIT_MIN_N = 8192  # out_features from which the split Triton backward beat eager's on the H100
DECODE_MAX_ROWS = 16  # the CUDA C++ one-pass decode kernel (csrc/lora_launch.h kDecodeMaxM)
CUDA_MAX_RANK = 256
FUSED_MAX_RANK = 64  # the one-launch Triton forward keeps a [BLOCK_M, r] accumulator next to the output tile
TRITON_MAX_RANK = 256  # the largest padded rank of the Triton kernels' tile tables (kernels/configs.py)


# --------------------------------------------------------------------------------------------------------------
# What a call is, and what runs it
# --------------------------------------------------------------------------------------------------------------
class Call(NamedTuple):
    device: torch.device
    dtype: torch.dtype
    M: int  # rows (plans are kept per power of two: ``bucket``)
    K: int
    N: int
    r: int  # the rank; a mixed batch: the adapters' stacked rank
    dropout: bool
    grads: int  # 0: inference (no grad), 1: grads of the adapters only (x needs none), 2: and of x
    deterministic: bool
    adapters: int = 0  # 0: one adapter; n >= 1: a mixed batch over n adapters
    quant: str = ""  # a quantized W0 (QLoRA): "nf4", "fp4", "int8", "_dq" appended for double quantization
    dora: bool = False  # DoRA: LoRA's variants around its column scale, the forward's on dropout(x) without dropout


class Plan(NamedTuple):
    forward: str
    backward: str
    xa_splits: int = 0  # programs the thin xa kernel may reach by splitting K (0: never split)

    @property
    def spec(self) -> str:
        """The plan as a string (what the ops receive, what ``backend=`` accepts): "forward+backward[@splits]"."""
        return f"{self.forward}+{self.backward}" + (f"@{self.xa_splits}" if self.xa_splits else "")


def bucket(M: int) -> int:
    """Rows as plans are kept: rounded up to a power of two (0 stays 0)."""
    return 1 << (M - 1).bit_length() if M > 0 else 0


def _padded_rank(r: int) -> int:
    return max(16, bucket(r))


@functools.lru_cache(maxsize=256)
def parse_spec(spec: str) -> Plan:
    """"forward+backward[@splits]" -> Plan; raises ValueError naming what is wrong."""
    body, _, splits = spec.partition("@")
    fwd, sep, bwd = body.partition("+")
    single, mixed = fwd in FORWARDS and bwd in BACKWARDS, fwd in MIXED_FORWARDS and bwd in MIXED_BACKWARDS
    if not sep or not (single or mixed) or (splits and not splits.isdigit()):
        raise ValueError(
            f"backend: unknown name {spec!r}; expected 'auto', a backend ({', '.join(map(repr, FAMILIES))}) or a plan "
            f"'forward+backward[@xa_splits]' with forward in {FORWARDS} (mixed batches {MIXED_FORWARDS}) and backward "
            f"in {BACKWARDS} (mixed {MIXED_BACKWARDS})")
    return Plan(fwd, bwd, int(splits or 0))


def check_name(name: str) -> str:
    """Raise a ValueError unless `name` is 'auto', a backend family or a valid plan spec; returns it."""
    if not isinstance(name, str):
        raise ValueError(f"backend: expected a string, got {type(name).__name__}")
    if name not in NAMES:
        parse_spec(name)
    return name


# --------------------------------------------------------------------------------------------------------------
# Which variant fits which call (pure functions of the call)
# --------------------------------------------------------------------------------------------------------------
def _kind_unfit(kind: str, name: str, call: Call, single: tuple, mixed_names: tuple) -> str | None:
    """What forward and backward variants share: the name of the call's kind (single adapter or mixed batch), the
    unfused variants fitting everything, the kernels' dtypes, fp32 through cuBLAS. A reason, "" (fits, nothing more to
    check) or None (the variant's own checks decide)."""
    mixed = call.adapters > 0
    names = mixed_names if mixed else single
    if name not in names:
        return f"{name!r} is not a {'mixed-batch ' if mixed else ''}{kind} variant (those are {names})"
    if name in ("torch", "aten"):
        return ""
    if call.dtype not in backends.KERNEL_DTYPES:
        return f"it supports float16, bfloat16 and float32, not {call.dtype}"
    if name.startswith("triton_") and call.dtype == torch.float32 and not mixed:
        return "fp32 runs through cuBLAS (Triton's fp32 dots sum in sequence: less accurate): use 'aten'"
    return None


def forward_unfit(name: str, call: Call) -> str | None:
    """Why forward variant `name` cannot run `call` (None: it can), from the call alone; the family's
    availability on this machine is ``family_unavailable``'s."""
    why = _kind_unfit("forward", name, call, FORWARDS, MIXED_FORWARDS)
    if why is not None:
        return why or None
    if name.startswith("triton_"):
        if _padded_rank(call.r) > TRITON_MAX_RANK:
            return f"its tiles serve ranks up to {TRITON_MAX_RANK} (r = {call.r})"
        if name == "triton_fused" and call.dropout and not call.dora:
            return "it runs without dropout (the mask would be drawn again by every column of programs)"
        if name == "triton_fused" and _padded_rank(call.r) > FUSED_MAX_RANK:
            return f"it serves ranks up to {FUSED_MAX_RANK} (r = {call.r})"
        if name == "triton_sorted" and call.dropout:
            return "it runs without dropout (its rows are taken in adapter order, the mask follows row positions)"
        if name == "triton_quantized" and not call.quant:
            return "it reads a quantized base weight (QLoRA), and this call's is dense"
        if name == "triton_quantized" and call.N * call.K >= 2**31:
            return f"it indexes W0 with 32-bit offsets (N K = {call.N * call.K} >= 2**31)"
        return None
    if call.r > CUDA_MAX_RANK:
        return f"the CUDA C++ kernels serve ranks up to {CUDA_MAX_RANK} (r = {call.r})"
    if name == "cuda_decode" and bucket(call.M) > DECODE_MAX_ROWS:
        return f"it serves up to {DECODE_MAX_ROWS} rows (M = {call.M})"
    return None


def backward_unfit(name: str, call: Call) -> str | None:
    """Why backward variant `name` cannot run `call` (None: it can)."""
    why = _kind_unfit("backward", name, call, BACKWARDS, MIXED_BACKWARDS)
    if why is not None:
        return why or None
    if name.startswith("triton_"):
        if _padded_rank(call.r) > TRITON_MAX_RANK:
            return f"its tiles serve ranks up to {TRITON_MAX_RANK} (r = {call.r})"
        if name == "triton_fused" and call.grads == 1:
            return "it computes dX, and x needs no grad in this call"
        return None
    if call.r > CUDA_MAX_RANK:
        return f"the CUDA C++ kernels serve ranks up to {CUDA_MAX_RANK} (r = {call.r})"
    return None


def _family_of(variant: str) -> str:
    return variant.split("_", 1)[0] if variant.startswith(("triton_", "cuda")) else variant


def family_unavailable(family: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why a backend family cannot run tensors of `dtype` on `device` here (None: it can)."""
    if family == "aten":
        return None
    return backends.BACKENDS[family].unavailable_reason(device, dtype)


def xa_split_target(call: Call, sm_count: int) -> int:
    """Programs the thin xa kernel should reach by splitting K when its row x rank tiles are fewer (0: never):
    two per SM. Not in deterministic mode (the partial sums are added with atomics, in any order)."""
    return 0 if call.deterministic or sm_count <= 0 else 2 * sm_count


def _preferences(call: Call) -> tuple[tuple, tuple]:
    """The static order of preference of the forward and backward variants for a call on a GPU: the best guesses
    from the H100 run (bench/results/h100-20261125, docs/design.md). Static defaults serve where nothing is measured:
    compiled graphs and CUDA graphs (little host time per call, so GPU time decides), deterministic mode,
    LORA_KERNELS_TUNE=off."""
    if call.dtype == torch.float64:
        return ("torch", "aten"), ("torch", "aten")
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


def _allowed(family: str, call: Call) -> tuple[tuple, tuple]:
    f, b, mf, mb = FAMILIES[family] if family != "auto" else _union(AUTO_FAMILIES)
    return (mf, mb) if call.adapters else (f, b)


@functools.lru_cache(maxsize=None)
def _union(families: tuple) -> tuple:
    return tuple(tuple(dict.fromkeys(v for fam in families for v in FAMILIES[fam][i])) for i in range(4))


def candidates(call: Call, family: str = "auto") -> tuple[list, list, dict]:
    """(forward variants, backward variants, {variant: why not}) that can run `call` here, for `family` ("auto":
    every family measured on CUDA)."""
    if family != "auto":
        reason = family_unavailable(family, call.device, call.dtype)
        if reason:  # a family asked for by name runs its own kernels or refuses, never another family's
            return [], [], {family: reason}
    fwd_allowed, bwd_allowed = _allowed(family, call)
    why = {}
    down = {}
    for fam in dict.fromkeys(_family_of(v) for v in fwd_allowed + bwd_allowed):
        down[fam] = family_unavailable(fam, call.device, call.dtype) if fam != "cuda" or family != "auto" \
            else _cuda_unavailable_without_build(call.device, call.dtype)
    fwds, bwds = [], []
    for names, unfit, out in ((fwd_allowed, forward_unfit, fwds), (bwd_allowed, backward_unfit, bwds)):
        for v in names:
            reason = down[_family_of(v)] or unfit(v, call)
            if reason:
                why.setdefault(v, reason)
            else:
                out.append(v)
    return fwds, bwds, why


def _cuda_unavailable_without_build(device, dtype) -> str | None:
    """`auto` considers the CUDA C++ kernels when the extension is already built (never a just-in-time build)."""
    from . import cuda_ext

    if not cuda_ext.built():
        return "the CUDA C++ extension is not built (backend='cuda' builds it just in time in a source checkout)"
    return family_unavailable("cuda", device, dtype)


def default_plan(call: Call, family: str = "auto") -> Plan:
    """The static plan for a call: the first eligible variant of the static order of preference. On CPU `auto`
    runs the torch reference (the interpreter is a correctness tool, not a fast path)."""
    if family == "auto" and call.device.type != "cuda":
        family = "torch"
    fwds, bwds, why = candidates(call, family)
    pf, pb = _preferences(call)
    fwd = next((v for v in pf if v in fwds), fwds[0] if fwds else None)
    bwd = next((v for v in pb if v in bwds), bwds[0] if bwds else None)
    if fwd is None or bwd is None:
        reasons = "; ".join(f"{v}: {r}" for v, r in why.items())
        raise backends.BackendUnavailableError(
            f"backend {family!r} cannot run {call.dtype} tensors on {call.device} for this call ({reasons})")
    return Plan(fwd, bwd, _splits(call, fwd))


def static_plan(call: Call) -> Plan:
    """What `auto` runs for `call` on a GPU where nothing is measured, whatever this machine has (benchmarks and
    reports made without a GPU): the first variants of the static order of preference that fit the call, the CUDA C++
    ones aside (they need the extension built). Launch parameters as on an H100 (132 SMs)."""
    pf, pb = _preferences(call)
    fwd = next(v for v in pf if not v.startswith("cuda") and not forward_unfit(v, call))
    bwd = next(v for v in pb if v != "cuda" and not backward_unfit(v, call))
    splits = xa_split_target(call, 132) if fwd in _SPLITTING else 0
    return Plan(fwd, bwd, splits)


def aux_kernels(plan: Plan) -> bool:
    """Whether the auxiliary passes around a plan's variants (the dropout mask of a dropped x, DoRA's weight norm,
    column scale and magnitude grad, QLoRA's dequantization) run as Triton kernels: next to the Triton and CUDA
    families' variants; the torch and aten families run their plain-PyTorch twins and never launch a kernel of
    another family. (Where Triton cannot run the tensors, the twins serve anyway: ``backends.triton_serves``.)"""
    return plan.forward.startswith(("triton_", "cuda_"))


def aux_kernels_for(backend: str, device: torch.device) -> bool:
    """``aux_kernels`` for a backend name before a call's plan is known (DoRA's norm is an input of its op): the
    forced plan's or family's, and for `auto` the Triton kernels on CUDA (where `auto` runs the fused families)."""
    if backend == "auto":
        backend = settings().forced or ("triton" if device.type == "cuda" else "torch")
    if backend in FAMILIES:
        return backend in ("triton", "cuda")
    return aux_kernels(parse_spec(backend))


# the forward variants whose thin xa kernel may split K (triton_cublas stores a rounded copy of s xa, which needs the
# whole sum)
_SPLITTING = ("triton_xa_first", "triton_quantized", "triton_gated", "triton_gated_cublas")


def _splits(call: Call, forward: str) -> int:
    if forward not in _SPLITTING or call.device.type != "cuda":
        return 0
    return xa_split_target(call, _sm_count(call.device))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(_index(device)).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def plan_unfit(plan: Plan, call: Call) -> str | None:
    """Why `plan` cannot run `call` here (None: it can): a variant that does not fit the call, or whose family is
    unavailable on this machine now."""
    why = forward_unfit(plan.forward, call) or family_unavailable(_family_of(plan.forward), call.device, call.dtype)
    if why:
        return f"forward {plan.forward!r} cannot run this call: {why}"
    if call.grads:
        why = backward_unfit(plan.backward, call) or family_unavailable(_family_of(plan.backward), call.device,
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


# --------------------------------------------------------------------------------------------------------------
# Settings (the environment, read here only)
# --------------------------------------------------------------------------------------------------------------
class Settings(NamedTuple):
    forced: str | None
    tune: str
    cache_dir: str


TUNE_MODES = ("on", "cached", "off")
_settings: Settings | None = None


def settings() -> Settings:
    global _settings
    if _settings is None:
        forced = os.environ.get("LORA_KERNELS_BACKEND") or None
        if forced is not None:
            if forced == "auto":
                forced = None
            else:
                try:
                    check_name(forced)
                except ValueError as e:
                    raise ValueError(f"LORA_KERNELS_BACKEND: {e}") from None
        tune = os.environ.get("LORA_KERNELS_TUNE", "on") or "on"
        if tune not in TUNE_MODES:
            raise ValueError(f"LORA_KERNELS_TUNE: expected one of {', '.join(TUNE_MODES)}, got {tune!r}")
        cache_dir = os.environ.get("LORA_KERNELS_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "lora_kernels")
        _settings = Settings(forced, tune, cache_dir)
        apply_autotune_setting()
    return _settings


def apply_autotune_setting() -> None:
    """LORA_KERNELS_TUNE=off also launches the first config of each Triton kernel table untimed (the tables list
    the usual winners first): nothing measured, so bits repeat from run to run."""
    configs = sys.modules.get("lora_kernels.kernels.configs")
    if configs is None:
        return
    try:
        tune = settings().tune
    except ValueError:  # a bad knob is reported where the plan is chosen
        return
    configs.AUTOTUNE = tune != "off"


def reset() -> None:
    """Read the environment again and forget every plan in memory (the disk cache stays)."""
    global _settings
    _settings = None
    _MEMO.clear()
    _CACHES.clear()
    _warned.clear()
    settings()


# --------------------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------------------
_warned: set = set()
_lock = threading.Lock()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _version(module: str) -> str:
    mod = sys.modules.get(module)
    if mod is None:
        try:
            mod = __import__(module)
        except Exception:
            return "none"
    return str(getattr(mod, "__version__", "none"))


@functools.lru_cache(maxsize=None)
def _driver_version() -> str:
    try:
        import ctypes

        v = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v))
        return str(v.value)
    except Exception:
        return "unknown"


def context(device: torch.device) -> dict:
    """What a cached plan was measured on: a plan measured elsewhere (another GPU model, driver, CUDA, torch, Triton
    or lora-kernels version, the CUDA C++ extension present or not) is never used. The extension's state is read
    now, not once: a just-in-time build (backend='cuda') changes it within the process."""
    ext = "absent"
    if device.type == "cuda":
        from . import cuda_ext

        ext = "built" if cuda_ext.built() else "absent"
    return dict(_fixed_context(device), cuda_ext=ext)


@functools.lru_cache(maxsize=None)
def _fixed_context(device: torch.device) -> dict:
    from . import __version__

    name = torch.cuda.get_device_name(_index(device)) if device.type == "cuda" else device.type
    return {"device": name, "cuda": torch.version.cuda or "none", "driver": _driver_version() if device.type == "cuda"
            else "none", "torch": torch.__version__, "triton": _version("triton"), "lora_kernels": __version__}


def cache_path(device: torch.device) -> str:
    """The plan cache file for `device`: one per context (GPU model and software versions)."""
    ctx = context(device)
    digest = hashlib.sha256(json.dumps(ctx, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() else "-" for c in ctx["device"]).strip("-").lower()[:40]
    return os.path.join(settings().cache_dir, f"plans-{slug}-{digest}.json")


def entry_key(family: str, call: Call) -> str:
    """The cache key of a call: the family asked for and the call, rows rounded up to a power of two."""
    return (f"{family}|{str(call.dtype).replace('torch.', '')}|M{bucket(call.M)}|K{call.K}|N{call.N}|r{call.r}|"
            f"p{int(call.dropout)}|g{call.grads}|d{int(call.deterministic)}|a{call.adapters}"
            + (f"|q{call.quant}" if call.quant else "") + ("|dora" if call.dora else ""))


def _read(path: str, device: torch.device) -> dict:
    """The entries of a cache file; {} when it is missing. A corrupt file, or one written for another context,
    warns once and is ignored."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        _warn_once(f"read-{path}", f"lora_kernels: the plan cache {path} cannot be read ({type(e).__name__}: {e}); "
                                   "ignored (plans are measured again and kept in memory)")
        return {}
    if not isinstance(data, dict) or data.get("context") != context(device) or not isinstance(data.get("entries"), dict):
        _warn_once(f"foreign-{path}", f"lora_kernels: the plan cache {path} was written for another GPU or other "
                                      "versions (or is damaged); ignored")
        return {}
    out = {}
    for key, e in data["entries"].items():
        try:
            out[key] = dict(e, plan=parse_spec(e["plan"]).spec)
        except (KeyError, TypeError, ValueError):
            continue  # an entry this version cannot read is skipped, the others serve
    return out


class _DiskCache:
    def __init__(self, device: torch.device, path: str):
        self.device = device
        self.path = path
        self.entries = _read(self.path, device)

    def put(self, key: str, entry: dict) -> None:
        self.entries[key] = entry
        try:
            self._write(key, entry)
        except OSError as e:
            _warn_once(f"write-{self.path}", f"lora_kernels: the plan cache {self.path} cannot be written "
                                             f"({type(e).__name__}: {e}); plans are kept in memory only")

    def _write(self, key: str, entry: dict) -> None:
        """Merge the entry into the file under an exclusive lock (two processes tuning at once keep both's
        entries), written to a temporary file and renamed over the old one (a reader never sees half a file)."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with _file_lock(self.path + ".lock"):
            current = _read(self.path, self.device)
            current[key] = entry
            self.entries.update(current)
            fd, tmp = tempfile.mkstemp(prefix=".plans-", dir=os.path.dirname(self.path))
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"format": 1, "context": context(self.device), "entries": current}, f, indent=1,
                              sort_keys=True)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


@contextlib.contextmanager
def _file_lock(path: str):
    try:
        import fcntl
    except ImportError:  # not POSIX: the rename alone keeps the file whole (a concurrent entry may be lost)
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_CACHES: dict = {}


def _cache(device: torch.device) -> _DiskCache:
    """The cache of `device` in the present context (a cold lookup's path: the context is read again each time)."""
    path = cache_path(device)
    c = _CACHES.get(path)
    if c is None:
        with _lock:
            c = _CACHES.get(path)
            if c is None:
                c = _CACHES[path] = _DiskCache(device, path)
    return c


# --------------------------------------------------------------------------------------------------------------
# Choosing
# --------------------------------------------------------------------------------------------------------------
_MEMO: dict = {}
# Cold lookups (a key not in the memo: cache read, measuring) run one at a time: two threads never time the same new
# key at once, and the memo is written under it. Warm lookups read the memo without it.
_CHOOSE_LOCK = threading.RLock()


def memo_key(backend: str, call: Call) -> tuple:
    """The memo's key of a call: everything about it, rows rounded to their bucket."""
    return (backend, call.device, call.dtype, bucket(call.M), call.K, call.N, call.r, call.dropout, call.grads,
            call.deterministic, call.adapters, call.quant, call.dora)


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
            plan, final = _choose(call, backend, measure, timer)
            if final:
                _MEMO[key] = plan
    return plan


def _choose(call: Call, backend: str, measure: bool, timer) -> tuple[Plan, bool]:
    """(plan, whether it is final for this key: not a default served only because measuring was not allowed now)."""
    if backend == "auto" and settings().forced:
        backend = settings().forced
    if backend not in NAMES:
        return check_forced(parse_spec(backend), call), True
    if call.adapters and backend == "cuda":
        _warn_once("cuda-mixed", "lora_kernels: the CUDA C++ backend has no mixed-batch kernels; mixed batches run "
                                 "the Triton kernels")
    if backend == "auto" and call.device.type == "cuda":
        why = family_unavailable("triton", call.device, call.dtype)
        if why and call.dtype in backends.KERNEL_DTYPES:
            _warn_once(f"fallback-{call.device}-{call.dtype}",
                       f"lora_kernels: the Triton kernels cannot run {call.dtype} on {call.device} ({why}); `auto` runs "
                       "the unfused ATen composition there. `python -m lora_kernels.info` shows the backends.")
    if call.M == 0:
        return default_plan(call, backend), True
    tune = settings().tune
    if tune == "off":
        return default_plan(call, backend), True
    key = entry_key(backend, call)
    entry = _cache(call.device).entries.get(key)
    if entry is not None:
        cached = parse_spec(entry["plan"])
        why = plan_unfit(cached, call)
        if why is None:
            return cached, True
        _warn_once(f"stale-{key}", f"lora_kernels: the cached plan {cached.spec} for {key} cannot run here now ({why}); "
                                   "chosen again")
    blocked = why_not_measure(call) if measure else "measuring not asked for"
    if blocked is None:
        return tune_call(call, backend, timer)[0], True
    permanent = tune != "on" or call.device.type != "cuda" or call.deterministic or backends.triton_interpreting()
    return default_plan(call, backend), permanent


def resolve_spec(spec: str, call: Call) -> Plan:
    """What an op runs for its `plan` argument ('auto', a family or a plan spec) on a concrete call: the cached or
    static plan, checked, never timed (graphs traced by torch.compile, direct op calls)."""
    return choose(call, spec, measure=False)


# --------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------
def cuda_event_timer(label: str, fn: Callable[[], object]) -> float:
    """Seconds per call of `fn`: CUDA events around back-to-back calls (host launch cost included where it exceeds
    the GPU's time), after a warm-up that absorbs compiling and Triton's autotuning; the median of 5 rounds."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    reps = max(3, min(50, int(1.0 / max(start.elapsed_time(end), 1e-3))))  # about a millisecond per round
    rounds = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        rounds.append(start.elapsed_time(end) / reps / 1e3)
    return statistics.median(rounds)


class _Scratch(NamedTuple):
    x: torch.Tensor
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    grad_y: torch.Tensor | None
    seed: torch.Tensor | None
    p: float
    mixed: tuple | None  # (adapter_ids, rank_owner, scalings, dropout_ps)
    qweight: object = None  # QLoRA calls: a QuantizedWeight of W0's shape (weight is then unused)


def _scratch(call: Call) -> _Scratch:
    """Fresh inputs of the call's shape (rows: the bucket), from a private generator (torch's random stream is
    untouched, so tuning does not change the dropout masks a run draws)."""
    dev, dt, M, K, N, R = call.device, call.dtype, bucket(call.M), call.K, call.N, call.r
    g = torch.Generator(device=dev)
    g.manual_seed(0x5EED)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * scale).to(dt)

    p = 0.1 if call.dropout else 0.0
    seed = torch.tensor([0x5EED], dtype=torch.int64, device=dev) if call.dropout else None
    mixed = None
    if call.adapters:
        n = call.adapters
        ranks = [R // n + (i < R % n) for i in range(n)]
        owner = torch.repeat_interleave(torch.arange(n, dtype=torch.int32), torch.tensor(ranks)).to(dev)
        ids = torch.randint(-1, n, (M,), generator=g, device=dev, dtype=torch.int64).to(torch.int32)
        mixed = (ids, owner, [2.0] * n, [p] * n)
    qweight = _scratch_quantized(call, g) if call.quant else None
    weight = rnd(N, K, scale=K ** -0.5) if qweight is None else None
    return _Scratch(rnd(M, K), weight, rnd(R, K, scale=K ** -0.5), rnd(N, R, scale=R ** -0.5),
                    rnd(M, N) if call.grads else None, seed, p, mixed, qweight)


def _scratch_quantized(call: Call, g: torch.Generator):
    """A random quantized W0 of the call's shape and format (blocks of 64, double quantization's of 256)."""
    from .quantized import QuantizedWeight

    dev, N, K = call.device, call.N, call.K
    fmt, _, dq = call.quant.partition("_")
    empty = torch.empty(0, device=dev)
    uniform = lambda n, scale: torch.rand(n, generator=g, device=dev) * scale  # noqa: E731
    if fmt == "int8":
        data = torch.randint(-127, 128, (N, K), generator=g, device=dev, dtype=torch.int8)
        return QuantizedWeight(data, uniform(N, 0.02 / 127), empty, empty, empty, "int8", 0, 0, 0.0, (N, K))
    blocks = -(-N * K // 64)
    data = torch.randint(0, 256, ((N * K + 1) // 2,), generator=g, device=dev, dtype=torch.uint8)
    code = torch.linspace(-1.0, 1.0, 16, device=dev)
    if dq:
        absmax = torch.randint(0, 256, (blocks,), generator=g, device=dev, dtype=torch.uint8)
        return QuantizedWeight(data, absmax, code, uniform(-(-blocks // 256), 0.05), torch.linspace(-1.0, 1.0, 256,
                               device=dev), fmt, 64, 256, 0.02, (N, K))
    return QuantizedWeight(data, uniform(blocks, 0.05), code, empty, empty, fmt, 64, 0, 0.0, (N, K))


def run_forward(variant: str, s: _Scratch, save: bool, xa_splits: int = 0):
    """One forward of `variant` on scratch inputs: (y, xa)."""
    if s.qweight is not None:
        from . import quantized

        return quantized.forward(Plan(variant, "aten", xa_splits), s.x, s.qweight, None, s.lora_A, s.lora_B, s.seed,
                                 2.0, s.p, save)
    if s.mixed is None:
        return backends.FORWARD[variant](s.x, s.weight, None, s.lora_A, s.lora_B, s.seed, 2.0, s.p, save, xa_splits)
    return backends.MIXED_FORWARD[variant](s.x, s.weight, None, s.lora_A, s.lora_B, *s.mixed, s.seed, save,
                                           xa_splits)


def run_backward(variant: str, s: _Scratch, xa: torch.Tensor, need_dx: bool):
    """One backward of `variant` on scratch inputs, from a forward's saved product."""
    if s.qweight is not None:
        from . import quantized

        # (the plan's auxiliary passes follow its family: here the backward variant's)
        return quantized.backward(Plan(variant, variant), s.grad_y, s.x, s.qweight, s.lora_A, s.lora_B, xa, s.seed,
                                  2.0, s.p, need_dx, False)
    if s.mixed is None:
        return backends.BACKWARD[variant](s.grad_y, s.x, s.weight, s.lora_A, s.lora_B, xa, s.seed, 2.0, s.p,
                                          need_dx, False)
    return backends.MIXED_BACKWARD[variant](s.grad_y, s.x, s.weight, s.lora_A, s.lora_B, xa, *s.mixed, s.seed,
                                            need_dx, False)


def tune_call(call: Call, backend: str = "auto", timer=None) -> tuple[Plan, dict]:
    """Time every eligible candidate for `call` and keep the fastest (in memory and in the disk cache). Forward and
    backward are timed apart (every forward hands the backward the same saved state, so the fastest pair is the
    pair of the fastest); inference calls time the forward alone. Returns (plan, {"forward:<v>": us, ...}); a
    candidate that fails is left out, with its error in the times as a string. `timer(label, fn) -> seconds`
    (tests inject their own)."""
    timer = timer or cuda_event_timer
    fwds, bwds, _ = candidates(call, backend)
    pf, pb = _preferences(call)  # ties go to the static order of preference
    fwds = sorted(fwds, key=lambda v: pf.index(v) if v in pf else len(pf))
    bwds = sorted(bwds, key=lambda v: pb.index(v) if v in pb else len(pb))
    default = default_plan(call, backend)
    splits = default.xa_splits if default.forward in _SPLITTING else _splits(call, "triton_xa_first")
    times: dict = {}
    with torch.no_grad(), _autocast_off(call.device):
        inputs = _scratch(call)
        # DoRA's forward runs LoRA's forward variant on dropout(x) without dropout; its backward with it
        fwd_inputs = inputs._replace(p=0.0, seed=None) if call.dora else inputs
        for v in fwds:
            times[f"forward:{v}"] = _timed(timer, f"forward:{v}",
                                           lambda v=v: run_forward(v, fwd_inputs, call.grads > 0, splits))
        if call.grads and bwds:
            xa = run_forward("torch" if call.adapters else "aten", inputs, True)[1]
            for v in bwds:
                times[f"backward:{v}"] = _timed(timer, f"backward:{v}",
                                                lambda v=v: run_backward(v, inputs, xa, call.grads == 2))
        del inputs
    fastest = lambda kind, names, fallback: min(  # noqa: E731
        (n for n in names if isinstance(times.get(f"{kind}:{n}"), float)),
        key=lambda n: times[f"{kind}:{n}"], default=fallback)
    fwd = fastest("forward", fwds, default.forward)
    bwd = fastest("backward", bwds, default.backward) if call.grads else default.backward
    plan = Plan(fwd, bwd, _splits(call, fwd))
    us = {k: (round(v * 1e6, 2) if isinstance(v, float) else v) for k, v in times.items()}
    failed = [k for k, v in times.items() if not isinstance(v, float)]
    if failed:  # a failure may be transient (memory taken by others, a busy GPU): the key stays unmeasured on disk
        _warn_once(f"failed-{entry_key(backend, call)}", f"lora_kernels: measuring {entry_key(backend, call)}: "
                   f"{', '.join(f'{k} failed ({times[k]})' for k in failed)}; the plan of the others serves this "
                   "process and nothing is written to the cache")
    else:
        _cache(call.device).put(entry_key(backend, call), {
            "plan": plan.spec, "us": us,
            "tuned": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return plan, us


def _timed(timer, label, fn):
    try:
        return float(timer(label, fn))
    except torch.cuda.OutOfMemoryError as e:  # free what the failed candidate left, and leave it out
        torch.cuda.empty_cache()
        return f"OutOfMemoryError: {str(e)[:160]}"
    except Exception as e:  # a candidate that cannot run this shape here (resources, compilation) is left out
        return f"{type(e).__name__}: {str(e)[:160]}"


@contextlib.contextmanager
def _autocast_off(device: torch.device):
    with torch.autocast(device.type if device.type in ("cuda", "cpu") else "cpu", enabled=False):
        yield


def tune(call: Call, backend: str = "auto", timer=None) -> tuple[Plan, dict]:
    """Measure `call` now, whatever the device (``python -m lora_kernels.tune``; tests on CPU with their own timer),
    and keep the result; the memory memo of that key is replaced."""
    with _CHOOSE_LOCK:
        plan, us = tune_call(call, backend, timer)
        _MEMO.pop(memo_key(backend, call), None)
    return plan, us


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
TYPICAL = ((1, 4096, 4096, 16), (16, 4096, 4096, 16), (1024, 4096, 4096, 16), (8192, 4096, 4096, 16),
           (8192, 4096, 14336, 16))


def describe(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict:
    """For `python -m lora_kernels.info`: the settings, the cache file and its entries, and the plan `auto` would run
    for typical shapes (training with dropout 0.05 and inference)."""
    s = settings()
    path = cache_path(device)
    entries = _cache(device).entries
    out = {"cache": f"{path} ({len(entries)} entries)" if os.path.exists(path) else f"{path} (not written yet)"}
    plans = {}
    for M, K, N, r in TYPICAL:
        for grads, p in ((2, True), (0, False)):
            call = Call(device, dtype, M, K, N, r, p, grads, False)
            try:
                plan = choose(call, "auto", measure=False)
                cached = entry_key(s.forced or "auto", call) in _cache(device).entries
                plans[f"M={M} K={K} N={N} r={r} {'train p>0' if grads else 'inference'}"] = (
                    f"{plan.spec if grads else plan.forward} ({'measured' if cached else 'static default'})")
            except Exception as e:  # a forced backend that cannot run here: say so
                plans[f"M={M} K={K} N={N} r={r}"] = f"error: {e}"
                break
    out["plans (bf16)"] = plans
    return out
