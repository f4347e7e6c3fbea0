"""Demo: a FusedLoRALinear layer, parity against the fp64 reference for every backend, the activation memory it
saves for the backward next to PEFT's (exact, any machine), and one timing line per backend and for `auto` (the
planner's choice), next to the unfused (PEFT-style eager) and merged-weight baselines.

    python -m bench.demo            # GPU if present; otherwise CPU, Triton kernels in the interpreter

On CPU the Triton kernels run in Triton's interpreter: their numbers prove correctness, not speed.
"""

from __future__ import annotations

import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from torch import nn  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels import FusedLoRALinear, backends, plan, reference  # noqa: E402


def eager_lora(x, layer: FusedLoRALinear, p: float):
    """The unfused layer as HF PEFT writes it: base(x) + lora_B(lora_A(dropout(x))) * scaling."""
    base = nn.functional.linear(x, layer.weight, layer.bias)
    d = nn.functional.dropout(x, p) if p > 0 else x
    return base + nn.functional.linear(nn.functional.linear(d, layer.lora_A), layer.lora_B) * layer.scaling


def _time(fn, device, reps):
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def parity(layer: FusedLoRALinear, x: torch.Tensor, p: float, backend: str) -> tuple[float, float, bool]:
    """Forward+backward through `backend` vs the fp64 reference with the same dropout seed.
    Returns (max error, same-dtype reference max error, passes the 2x rule)."""
    seed = torch.tensor([1234], dtype=torch.int64, device=x.device)
    xs, a, b = (t.detach().clone().requires_grad_(True) for t in (x, layer.lora_A, layer.lora_B))
    y = lora_kernels.lora_linear(xs, layer.weight, layer.bias, a, b, layer.scaling, p, backend=backend, seed=seed)
    gy = torch.randn_like(y)
    y.backward(gy)
    outs = (y, xs.grad, a.grad, b.grad)
    refs = []
    for dtype in (x.dtype, torch.float64):
        args = [t.detach().to(dtype) for t in (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)]
        ry, xa = reference.lora_forward(*args, layer.scaling, p, 1234)
        rdx, rda, rdb = reference.lora_backward(gy.to(dtype), args[0], args[1], args[3], args[4], xa,
                                                layer.scaling, p, 1234)
        refs.append((ry, rdx, rda, rdb))
    err = max((o.double() - r).abs().max().item() for o, r in zip(outs, refs[1]))
    ref_err = max((s.double() - r).abs().max().item() for s, r in zip(refs[0], refs[1]))
    ok = all((o.double() - r).abs().max() <= 2 * (s.double() - r).abs().max() + 2 * torch.finfo(x.dtype).eps * r.abs().max()
             for o, s, r in zip(outs, refs[0], refs[1]))
    return err, ref_err, ok


def main():
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    M, K, N, r, p = (8192, 4096, 4096, 16, 0.1) if gpu else (128, 192, 160, 16, 0.1)
    torch.manual_seed(0)
    # adapters in the layer's dtype (not fp32 masters): the parity check hands them to the ops as they are
    layer = FusedLoRALinear(K, N, r=r, lora_alpha=2 * r, lora_dropout=p, init_lora_weights=False,
                            device=device, dtype=dtype, lora_dtype=dtype)
    x = torch.randn(M, K, device=device, dtype=dtype)
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"lora-kernels {lora_kernels.__version__} | torch {torch.__version__} | {name} | "
          f"x [{M}, {K}] -> [{M}, {N}], r={r}, dropout={p}, {str(dtype).replace('torch.', '')}")
    usable = [b for b in ("torch", "aten", "triton", "cuda")
              if backends.BACKENDS[b].unavailable_reason(device, dtype) is None]
    skipped = {b: backends.BACKENDS[b].unavailable_reason(device, dtype) for b in ("triton", "cuda") if b not in usable}
    print("\nparity vs fp64 reference (forward + grads of x, A, B; rule: error <= 2 x same-dtype torch error + 2 ulp)")
    for b in usable:
        err, ref_err, ok = parity(layer, x, p, b)
        print(f"  {b:8s} max error {err:.3e}   same-dtype torch error {ref_err:.3e}   {'PASS' if ok else 'FAIL'}")
    for b, why in skipped.items():
        print(f"  {b:8s} skipped: {why}")
    memory_line(K, N, r, p, dtype)

    reps = 20 if gpu else 3
    note = "" if gpu else "  (Triton on CPU = interpreter: a correctness tool, not a speed figure)"
    print(f"\nmedian time per call, ms{note}")
    if p > 0:
        print("  (backend=torch is the unfused reference: its dropout mask is the kernels' Philox in plain tensor ops,"
              " slower than torch's own dropout)")
    xg = x.clone().requires_grad_(True)
    gy = torch.randn(M, N, device=device, dtype=dtype)

    def fwd_bwd(fn):
        def run():
            xg.grad = None
            layer.lora_A.grad = layer.lora_B.grad = None
            fn().backward(gy)
        return run

    rows = [("base linear (= merged LoRA)", lambda: nn.functional.linear(x, layer.weight, layer.bias), None),
            ("eager LoRA (PEFT style)", lambda: eager_lora(x, layer, p), fwd_bwd(lambda: eager_lora(xg, layer, p)))]
    for b in usable + ["auto"]:
        fused = lambda inp, b=b: lora_kernels.lora_linear(inp, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                                           layer.scaling, p, backend=b)
        label = {"torch": "lora_kernels, backend=torch", "aten": "ATen composition, backend=aten",
                 "auto": "lora_kernels, backend=auto"}.get(b, f"fused, backend={b}")
        rows.append((label, lambda f=fused: f(x), fwd_bwd(lambda f=fused: f(xg))))
    base = None
    for label, fwd, train in rows:
        with torch.no_grad():
            t_fwd = _time(fwd, device, reps)
        # the base layer alone has nothing to train (W0 frozen): no forward+backward figure
        t_train = f"{_time(train, device, reps):9.3f}" if train is not None else "        -"
        base = base or t_fwd
        print(f"  {label:30s} forward {t_fwd:9.3f} ({t_fwd / base:5.2f}x base)   forward+backward {t_train}")
    call = plan.Call(device, dtype, M, K, N, r, p > 0, 2, torch.are_deterministic_algorithms_enabled())
    chosen = plan.choose(call, measure=False)
    source = "measured on this GPU" if device.type == "cuda" else "the static default here; on a GPU it is measured"
    print(f"  backend=auto ran the plan {chosen.spec} ({source}; `python -m lora_kernels.info` lists plans)")


def memory_line(K, N, r, p, dtype):
    """Bytes this layer saves for its backward per token, exact (counted on the meta device), next to PEFT's."""
    from bench.host import EagerLoRA, _peft_layer
    from bench.memory import module_saved_per_token

    def base(device):
        return nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)

    figures = {"eager LoRA (PEFT style)": module_saved_per_token(lambda d: EagerLoRA(base(d), r, 2 * r, p), K, dtype)}
    try:
        figures["PEFT's LoRA Linear"] = module_saved_per_token(lambda d: _peft_layer(base(d), r, 2 * r, p), K, dtype)
    except ImportError:
        pass
    figures["lora_kernels"] = module_saved_per_token(
        lambda d: FusedLoRALinear.from_linear(base(d), r=r, lora_alpha=2 * r, lora_dropout=p), K, dtype)
    x_bytes = K * torch.finfo(dtype).bits // 8
    print(f"\nactivation memory saved for the backward, bytes per token (exact, by storage; x itself is {x_bytes}):")
    print("  " + "   ".join(f"{k} {v:.0f}" for k, v in figures.items())
          + f"   (lora_kernels: x and the fp32 [M, {r}] product; no mask, no dropped or cast copy)")


if __name__ == "__main__":
    main()
