"""The implementations of the op contract, which of them can run here, and why not.

Every backend provides the same two functions on 2-D inputs (see ``lora_kernels.ops`` for the contract):

    forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa) -> (y, xa)
    backward(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic)
        -> (dx or empty, dA, dB)

``seed`` is a one-element int64 tensor on the inputs' device (None when dropout_p == 0); ``xa`` is the
fp32 (fp64 for fp64 inputs) product dropout(x) A^T that the forward saves for the backward.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from . import reference

NAMES = ("auto", "torch", "triton", "cuda")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ALL_DTYPES = KERNEL_DTYPES + (torch.float64,)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run these tensors here; the message says why."""


# --------------------------------------------------------------------------------------------
# torch: the reference formulas, in the inputs' dtype.
# --------------------------------------------------------------------------------------------
def _xa_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchBackend:
    name = "torch"

    @staticmethod
    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa):
        y, xa = reference.lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, _seed_int(seed))
        xa = xa.to(_xa_dtype(x.dtype)) if save_xa else x.new_empty((0,), dtype=_xa_dtype(x.dtype))
        return y, xa

    @staticmethod
    def backward(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic):
        dx, da, db = reference.lora_backward(grad_y, x, weight, lora_A, lora_B, xa, scaling, dropout_p,
                                             _seed_int(seed), need_dx)
        return (dx if need_dx else x.new_empty((0,))), da, db

    @staticmethod
    def mixed_forward(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps, seed, save):
        y, xs = reference.lora_mixed_forward(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings,
                                             dropout_ps, _seed_int(seed))
        xs = xs.to(_xa_dtype(x.dtype)) if save else x.new_empty((0,), dtype=_xa_dtype(x.dtype))
        return y, xs

    @staticmethod
    def mixed_backward(grad_y, x, weight, lora_A, lora_B, xs, adapter_ids, rank_owner, scalings, dropout_ps, seed,
                       need_dx, deterministic):
        dx, da, db = reference.lora_mixed_backward(grad_y, x, weight, lora_A, lora_B, xs, adapter_ids, rank_owner,
                                                   scalings, dropout_ps, _seed_int(seed), need_dx)
        return (dx if need_dx else x.new_empty((0,))), da, db


@functools.lru_cache(maxsize=64)
def _per_adapter_tensors(scalings: tuple, dropout_ps: tuple, device: torch.device):
    """(scalings fp32, dropout thresholds int32, 1 / (1 - p) fp32) on `device`, one entry per adapter."""
    from .kernels.dropout import dropout_args

    return (torch.tensor(scalings, dtype=torch.float32, device=device),
            torch.tensor([dropout_args(p)[0] for p in dropout_ps], dtype=torch.int32, device=device),
            torch.tensor([dropout_args(p)[1] for p in dropout_ps], dtype=torch.float32, device=device))


def _seed_int(seed):
    return None if seed is None else int(seed.reshape(()).item())


# --------------------------------------------------------------------------------------------
# triton: the fused kernels of lora_kernels.kernels.
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton cannot be imported ({type(e).__name__}: {e})"
    try:
        from . import kernels  # noqa: F401
    except Exception as e:
        return f"the Triton kernels failed to load ({type(e).__name__}: {e})"
    return None


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 before triton was imported)."""
    if _triton_import_error() is not None:
        return False
    from .kernels.configs import INTERPRET

    return INTERPRET


class TritonBackend:
    name = "triton"

    @staticmethod
    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
        err = _triton_import_error()
        if err:
            return err
        if dtype not in KERNEL_DTYPES:
            return f"the Triton kernels support float16, bfloat16 and float32, not {dtype}"
        if triton_interpreting():
            if device.type != "cpu":
                return "TRITON_INTERPRET=1 is set: the Triton interpreter runs on CPU tensors only"
            return None
        if device.type != "cuda":
            return (f"Triton kernels need CUDA tensors (got {device.type}); on CPU they run only in the "
                    "interpreter (set TRITON_INTERPRET=1 before triton is imported)")
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the Triton kernels need compute capability >= 8.0, the GPU has {major}.{minor}"
        return None

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa):
        from .kernels.forward import lora_forward

        return lora_forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa)

    @staticmethod
    def backward(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic):
        from .kernels.backward import lora_backward

        return lora_backward(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic)

    @staticmethod
    def _gating(x, adapter_ids, rank_owner, scalings, dropout_ps):
        """The per-row / per-rank tensors the gated kernels read. The per-adapter values come from a small cache:
        building them from Python lists each call would be a host-to-device copy, which waits for the stream."""
        scales, thresholds, keep_scales = _per_adapter_tensors(tuple(scalings), tuple(dropout_ps), x.device)
        return (adapter_ids.to(torch.int32).contiguous(), rank_owner.to(torch.int32).contiguous(), scales,
                thresholds, keep_scales)

    @staticmethod
    def mixed_forward(x, weight, bias, lora_A, lora_B, adapter_ids, rank_owner, scalings, dropout_ps, seed, save):
        from .kernels.forward import lora_mixed_forward

        gating = TritonBackend._gating(x, adapter_ids, rank_owner, scalings, dropout_ps)
        return lora_mixed_forward(x, weight, bias, lora_A, lora_B, seed, any(p > 0 for p in dropout_ps), gating, save)

    @staticmethod
    def mixed_backward(grad_y, x, weight, lora_A, lora_B, xs, adapter_ids, rank_owner, scalings, dropout_ps, seed,
                       need_dx, deterministic):
        from .kernels.backward import lora_mixed_backward

        gating = TritonBackend._gating(x, adapter_ids, rank_owner, scalings, dropout_ps)
        return lora_mixed_backward(grad_y, x, weight, lora_A, lora_B, xs, seed, any(p > 0 for p in dropout_ps),
                                   gating, need_dx, deterministic)


# --------------------------------------------------------------------------------------------
# cuda: the csrc extension.
# --------------------------------------------------------------------------------------------
class CudaBackend:
    """The csrc/ kernels: a tiled tensor-core forward (one launch), a cooperative one-pass decode forward for
    M <= 16, and a one-launch backward. Allocation and the grads' final casts happen here; the binding checks and
    launches. Mixed-adapter batches have no CUDA C++ kernels: they run the Triton kernels (warned once)."""

    name = "cuda"
    DECODE_MAX_M = 16  # csrc/lora_launch.h kDecodeMaxM
    BWD_BLOCK_M = 64  # kBwdBlockM: one dA/dB partial per 64 rows in deterministic mode
    MAX_RANK = 256

    @staticmethod
    def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return f"the CUDA C++ kernels need CUDA tensors (got {device.type})"
        if dtype not in KERNEL_DTYPES:
            return f"the CUDA C++ kernels support float16, bfloat16 and float32, not {dtype}"
        from . import cuda_ext

        reason = cuda_ext.load()
        if reason:
            return reason
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"the CUDA C++ kernels need compute capability >= 8.0, the GPU has {major}.{minor}"
        return None

    @staticmethod
    def _check_rank(lora_A):
        if lora_A.shape[0] > CudaBackend.MAX_RANK:
            raise BackendUnavailableError(f"backend 'cuda': rank r = {lora_A.shape[0]} is above the CUDA kernels' "
                                          f"limit {CudaBackend.MAX_RANK}; use backend='triton'")

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, seed, scaling, dropout_p, save_xa):
        from .kernels.memory import empty  # NaN-filled when the tests poison outputs

        CudaBackend._check_rank(lora_A)
        M, r = x.shape[0], lora_A.shape[0]
        x, weight, lora_A, lora_B = (t.contiguous() for t in (x, weight, lora_A, lora_B))
        bias = None if bias is None else bias.contiguous()
        y = empty((M, weight.shape[0]), x.device, x.dtype)
        decode = 1 <= M <= CudaBackend.DECODE_MAX_M
        if decode:  # xa, then the kernel's completion counter, in one buffer (one memset)
            buffer = empty((M * r + 1,), x.device, torch.float32)  # the kernel zeroes it
            xa = buffer[:M * r].view(M, r)
        else:
            buffer = xa = empty((M, r) if save_xa else (0,), x.device, torch.float32)
        torch.ops.lora_kernels_cuda.forward(x, weight, bias, lora_A, lora_B, seed if dropout_p > 0 else None, y,
                                            buffer, float(scaling), float(dropout_p), bool(save_xa), decode)
        return y, (xa if save_xa else x.new_empty((0,), dtype=torch.float32))

    @staticmethod
    def backward(grad_y, x, weight, lora_A, lora_B, xa, seed, scaling, dropout_p, need_dx, deterministic):
        from .kernels.memory import empty

        CudaBackend._check_rank(lora_A)
        (M, K), N, r = x.shape, weight.shape[0], lora_A.shape[0]
        grad_y, x, weight, lora_A, lora_B = (t.contiguous() for t in (grad_y, x, weight, lora_A, lora_B))
        f32 = dict(dtype=torch.float32, device=x.device)
        if deterministic:  # one partial per row tile, summed in a fixed order: bitwise repeatable
            parts = -(-M // CudaBackend.BWD_BLOCK_M)
            da, db = empty((parts, r, K), x.device, torch.float32), empty((parts, N, r), x.device, torch.float32)
        else:  # fp32 atomics into zeroed buffers (separate ones: the op's outputs must not alias each other)
            da, db = torch.zeros((r, K), **f32), torch.zeros((N, r), **f32)
        dx = empty((M, K), x.device, x.dtype) if need_dx else None
        torch.ops.lora_kernels_cuda.backward(grad_y, x, weight, lora_A, lora_B, xa.float().contiguous(),
                                             seed if dropout_p > 0 else None, dx, da, db, float(scaling),
                                             float(dropout_p), bool(deterministic))
        if deterministic:
            da, db = da.sum(0), db.sum(0)
        return (dx if need_dx else x.new_empty((0,))), da.to(x.dtype), db.to(x.dtype)

    @staticmethod
    def mixed_forward(*args):
        warn_once("cuda-mixed", "lora_kernels: the CUDA C++ backend has no mixed-adapter kernels; mixed batches run "
                                "the Triton kernels")
        return TritonBackend.mixed_forward(*args)

    @staticmethod
    def mixed_backward(*args):
        return TritonBackend.mixed_backward(*args)


BACKENDS = {b.name: b for b in (TorchBackend, TritonBackend, CudaBackend)}


# --------------------------------------------------------------------------------------------
# Choice
# --------------------------------------------------------------------------------------------
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_name(name: str) -> str:
    """Raise a ValueError unless `name` is one of NAMES; returns it."""
    if name not in NAMES:
        raise ValueError(f"backend: unknown name {name!r}; expected one of {', '.join(map(repr, NAMES))}")
    return name


@torch.compiler.assume_constant_result  # evaluated once while tracing, not traced into
def resolve(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend to run for tensors on `device` of `dtype`; raises if `name` cannot run them."""
    check_name(name)
    if name != "auto":
        reason = BACKENDS[name].unavailable_reason(device, dtype)
        if reason:
            raise BackendUnavailableError(f"backend {name!r} is unavailable for {dtype} tensors on {device}: {reason}")
        return name
    forced = os.environ.get("LORA_KERNELS_BACKEND")
    if forced:
        return resolve(forced, device, dtype)
    if device.type != "cuda" or dtype == torch.float64:
        return "torch"  # the fastest choice on CPU: the interpreter is a correctness tool, not a fast path
    reason = TritonBackend.unavailable_reason(device, dtype)
    if reason is None:
        return "triton"
    warn_once(f"auto-fallback-{device}-{dtype}",
              f"lora_kernels: falling back to the unfused torch backend on {device} ({dtype}): {reason}. "
              "`python -m lora_kernels.info` shows the backends and why they are unavailable.")
    return "torch"


def measured_choice(default: str, device: torch.device, dtype: torch.dtype, M, K: int, N: int, r: int) -> str:
    """For an inference call without dropout that `auto` resolved to `default`: "cuda" where the measurements
    (lora_kernels/policy.py) favour the CUDA C++ forward for this GPU and shape and the extension can run it, else
    `default`. Not applied under torch.compile (pass backend="cuda" there) or with LORA_KERNELS_BACKEND set."""
    if default != "triton" or torch.compiler.is_compiling() or os.environ.get("LORA_KERNELS_BACKEND"):
        return default
    from . import policy

    if policy.choose(device, dtype, M, K, N, r) != "cuda" or CudaBackend.unavailable_reason(device, dtype):
        return default
    return "cuda"


def status(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, str | None]:
    """{backend name: None if usable, else the reason} for tensors on `device` of `dtype`."""
    return {name: b.unavailable_reason(device, dtype) for name, b in BACKENDS.items()}
