"""Measuring a call: scratch inputs of its shape, every eligible candidate timed with CUDA events, the fastest kept
(in memory and on disk unless a candidate failed)."""

from __future__ import annotations

import contextlib
import datetime
import statistics
from typing import Callable, NamedTuple

import torch

from .. import backends
from .cache import cache_for, entry_key
from .calls import Call, Plan, bucket
from .rules import SPLITTING, aux_kernels_for, candidates, default_plan, launch_splits, preferences

__all__ = ["cuda_event_timer", "Scratch", "scratch", "scratch_quantized", "run_forward", "run_backward", "tune_call",
           "timed", "autocast_off"]


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


class Scratch(NamedTuple):
    x: torch.Tensor
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    grad_y: torch.Tensor | None
    seed: torch.Tensor | None
    p: float
    mixed: tuple | None  # (adapter_ids, rank_owner, scalings, dropout_ps)
    qweight: object = None  # QLoRA calls: a QuantizedWeight of W0's shape (weight is then unused)
    offsets: torch.Tensor | None = None  # experts calls: the slots split evenly over the experts (weight [E, N, K])


def scratch(call: Call) -> Scratch:
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
    if call.experts:  # the slots split evenly over the experts (routing balanced, as training aims for)
        E = call.experts
        offsets = torch.tensor([(e + 1) * M // E for e in range(E)], dtype=torch.int32, device=dev)
        return Scratch(rnd(M, K), rnd(E, N, K, scale=K ** -0.5), rnd(E, R, K, scale=K ** -0.5),
                       rnd(E, N, R, scale=R ** -0.5), rnd(M, N) if call.grads else None, seed, p, None,
                       offsets=offsets)
    qweight = scratch_quantized(call, g) if call.quant else None
    weight = rnd(N, K, scale=K ** -0.5) if qweight is None else None
    return Scratch(rnd(M, K), weight, rnd(R, K, scale=K ** -0.5), rnd(N, R, scale=R ** -0.5),
                    rnd(M, N) if call.grads else None, seed, p, mixed, qweight)


def scratch_quantized(call: Call, g: torch.Generator):
    """A random quantized W0 of the call's shape and format (blocks of 64, double quantization's of 256)."""
    from ..quantized import QuantizedWeight

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


def run_forward(variant: str, s: Scratch, save: bool, xa_splits: int = 0, aux: bool = False):
    """One forward of `variant` on scratch inputs: (y, xa); `aux` as the plan would run it."""
    if s.offsets is not None:
        return backends.EXPERTS_FORWARD[variant](s.x, s.weight, None, s.lora_A, s.lora_B, s.offsets, None, s.seed,
                                                 2.0, s.p, save, False, aux)
    if s.qweight is not None:
        from .. import quantized

        return quantized.forward(Plan(variant, "aten", xa_splits, aux), s.x, s.qweight, None, s.lora_A, s.lora_B,
                                 s.seed, 2.0, s.p, save)
    if s.mixed is None:
        return backends.FORWARD[variant](s.x, s.weight, None, s.lora_A, s.lora_B, s.seed, 2.0, s.p, save, xa_splits,
                                         aux)
    return backends.MIXED_FORWARD[variant](s.x, s.weight, None, s.lora_A, s.lora_B, *s.mixed, s.seed, save,
                                           xa_splits)


def run_backward(variant: str, s: Scratch, xa: torch.Tensor, need_dx: bool, aux: bool = False):
    """One backward of `variant` on scratch inputs, from a forward's saved product; `aux` as the plan would run it."""
    if s.offsets is not None:
        return backends.EXPERTS_BACKWARD[variant](s.grad_y, s.x, s.weight, s.lora_A, s.lora_B, xa, s.offsets, None,
                                                  s.seed, 2.0, s.p, need_dx, False, False, aux)
    if s.qweight is not None:
        from .. import quantized

        return quantized.backward(Plan("aten", variant, 0, aux), s.grad_y, s.x, s.qweight, s.lora_A, s.lora_B, xa,
                                  s.seed, 2.0, s.p, need_dx, False)
    if s.mixed is None:
        return backends.BACKWARD[variant](s.grad_y, s.x, s.weight, s.lora_A, s.lora_B, xa, s.seed, 2.0, s.p,
                                          need_dx, False, aux)
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
    pf, pb = preferences(call)  # ties go to the static order of preference
    fwds = sorted(fwds, key=lambda v: pf.index(v) if v in pf else len(pf))
    bwds = sorted(bwds, key=lambda v: pb.index(v) if v in pb else len(pb))
    default = default_plan(call, backend)
    splits = default.xa_splits if default.forward in SPLITTING else launch_splits(call, "triton_xa_first")
    times: dict = {}
    aux = aux_kernels_for(backend, call.device)
    with torch.no_grad(), autocast_off(call.device):
        inputs = scratch(call)
        # DoRA's forward runs LoRA's forward variant on dropout(x) without dropout; its backward with it
        fwd_inputs = inputs._replace(p=0.0, seed=None) if call.dora else inputs
        for v in fwds:
            times[f"forward:{v}"] = timed(timer, f"forward:{v}",
                                          lambda v=v: run_forward(v, fwd_inputs, call.grads > 0, splits, aux))
        if call.grads and bwds:
            xa = run_forward("torch" if call.adapters else "aten", inputs, True, 0, aux)[1]
            for v in bwds:
                times[f"backward:{v}"] = timed(timer, f"backward:{v}",
                                               lambda v=v: run_backward(v, inputs, xa, call.grads == 2, aux))
    fastest = lambda kind, names, fallback: min(  # noqa: E731
        (n for n in names if isinstance(times.get(f"{kind}:{n}"), float)),
        key=lambda n: times[f"{kind}:{n}"], default=fallback)
    fwd = fastest("forward", fwds, default.forward)
    bwd = fastest("backward", bwds, default.backward) if call.grads else default.backward
    plan = Plan(fwd, bwd, launch_splits(call, fwd), aux)
    us = {k: (round(v * 1e6, 2) if isinstance(v, float) else v) for k, v in times.items()}
    transient = [k for k, v in times.items() if isinstance(v, str) and _transient(v)]
    if transient:  # memory taken by others, a CUDA error: another process may time it: the key stays unmeasured on disk
        key = entry_key(backend, call)
        backends.warn_once(f"failed-{key}", f"lora_kernels: measuring {key}: "
                           f"{', '.join(f'{k} failed ({times[k]})' for k in transient)}; the plan of the others "
                           "serves this process and nothing is written to the cache")
    else:  # (a candidate that cannot run this shape here, a compile or resource limit, is left out for good)
        cache_for(call.device).put(entry_key(backend, call), {
            "plan": plan.spec, "us": us,
            "tuned": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return plan, us


def _transient(error: str) -> bool:
    """A candidate's failure that says nothing about the candidate itself: out of memory, a CUDA error (sticky or not)."""
    return error.startswith(("OutOfMemoryError", "AcceleratorError")) or "CUDA error" in error


def timed(timer, label, fn):
    try:
        return float(timer(label, fn))
    except torch.cuda.OutOfMemoryError as e:  # free what the failed candidate left, and leave it out
        torch.cuda.empty_cache()
        return f"OutOfMemoryError: {str(e)[:160]}"
    except Exception as e:  # a candidate that cannot run this shape here (resources, compilation) is left out
        return f"{type(e).__name__}: {str(e)[:160]}"


@contextlib.contextmanager
def autocast_off(device: torch.device):
    with torch.autocast(device.type if device.type in ("cuda", "cpu") else "cpu", enabled=False):
        yield
