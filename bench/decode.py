"""Decode-size forward (M <= 16 rows): the CUDA C++ one-pass kernel against the merged-weight GEMV, the base GEMV,
PEFT-style eager LoRA and the Triton backend, timed as GPU time (CUDA graphs of back-to-back calls: at these sizes
one call is ~10 us of GPU work and several times that of host time). Reports the effective W0 bandwidth against the
card's measured copy bandwidth. Needs a GPU.

Also the mixed-batch decode step: `--adapters` requests (one token each), each on its own adapter of rank r, served
by one FusedLoRALinear (`adapter_ids=`) against the base layer alone; the floor is the bytes of W0 plus all the
adapters' A and B over the bytes of W0 (32 adapters of r = 16 at K = N = 4096: 1.25).

    python -m bench.decode [--M 1,2,4,8,16] [--KN 4096x4096,4096x14336,14336x4096] [--r 16] [--adapters 32] [--out DIR]

Providers: base / merged GEMV, eager, and this package's plans: "auto" (what the planner picks on this GPU), and each
decode-sized forward variant forced (triton_fused, triton_xa_first, aten, cuda_decode where the extension is built).
"dora": DoRA in inference, the norm kept as a layer keeps it (`dora_vs_lora` against "auto").
QLoRA (with bitsandbytes): "bnb+eager" (bitsandbytes' NF4 layer, its gemv at M = 1, plus PEFT's LoRA term),
"qlora_auto" and "qlora_quantized" (the 4-bit Triton kernel forced); W0 bandwidth fractions count bf16 bytes.
"""

from __future__ import annotations

import argparse
import csv
import os

import torch
from torch import nn

from lora_kernels import FusedLoRALinear, backends, lora_linear, plan, qlora_linear, quantized_weight
from lora_kernels.dora import DoraNorms, dora_linear, dora_weight_norm
from lora_kernels.quantized import quantize_linear

from .mixed import SORTED

CALLS = 50  # calls per graph replay


def copy_bandwidth(device) -> float:
    """Bytes per second of a 1 GiB device-to-device copy, read + write counted."""
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * 10 * src.numel() / (start.elapsed_time(end) / 1e3)


def graph_time_us(fn, x_ring) -> float:
    """Median over replays of one graph holding CALLS calls (inputs rotate), per call, in microseconds."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for x in x_ring[:3]:
            fn(x)  # warm-up: autotuning and lazy init happen outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fn(x_ring[i % len(x_ring)])
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return sorted(times)[len(times) // 2]


FORWARDS = ("triton_fused", "triton_xa_first", "aten", "cuda_decode")  # the decode-sized forwards timed one by one


def providers(w, a, b, scaling):
    merged = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    out = {
        "base": lambda x: nn.functional.linear(x, w),
        "merged": lambda x: nn.functional.linear(x, merged),
        "eager": lambda x: nn.functional.linear(x, w) + nn.functional.linear(nn.functional.linear(x, a), b) * scaling,
        "auto": lambda x: lora_linear(x, w, None, a, b, scaling),
    }
    # DoRA in inference: the norm kept between calls (DoraNorms), as a layer keeps it; compare with "auto" (LoRA)
    magnitude = dora_weight_norm(w, a, b, scaling)[0].to(w.dtype) * 1.1
    norms = DoraNorms()
    out["dora"] = lambda x: dora_linear(x, w, None, a, b, magnitude, scaling, norms=norms)
    try:  # QLoRA: bitsandbytes' 4-bit layer (its gemv at M = 1) plus PEFT's LoRA term, against this package's
        dense = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        dense.weight = nn.Parameter(w, requires_grad=False)
        quantized = quantize_linear(dense, compute_dtype=w.dtype)
        qweight = quantized_weight(quantized)
        out["bnb+eager"] = lambda x: quantized(x) + nn.functional.linear(nn.functional.linear(x, a), b) * scaling
        out["qlora_auto"] = lambda x: qlora_linear(x, qweight, None, a, b, scaling)
        out["qlora_quantized"] = lambda x: qlora_linear(x, qweight, None, a, b, scaling,
                                                        backend="triton_quantized+triton_split")
    except ImportError as e:
        print(f"QLoRA rows skipped: {e}")
    for name in FORWARDS:
        family = plan.family_of(name)
        reason = plan.family_unavailable(family, w.device, w.dtype)
        if reason:
            print(f"{name}: unavailable ({reason})")
            continue
        spec = f"{name}+{plan.FAMILIES[family][1][0]}"
        out[name] = (lambda spec: lambda x: lora_linear(x, w, None, a, b, scaling, backend=spec))(spec)
    return out


def mixed_decode_row(w, r, adapters, ring, timer=graph_time_us):
    """One decode step of `adapters` requests on as many adapters: GPU time of the base layer and of the mixed-batch
    layer (Triton), their ratio and the bytes floor of that ratio."""
    N, K = w.shape
    # adapters served in W0's dtype (fp32 ones would be cast once and kept: the same kernels)
    layer = FusedLoRALinear(K, N, r=r, lora_alpha=2 * r, bias=False, init_lora_weights=False, _weight=w,
                            lora_dtype=w.dtype).eval()
    for i in range(1, adapters):
        layer.add_adapter(f"a{i}", r=r, lora_alpha=2 * r, init_lora_weights=False)
    ids = torch.arange(adapters, device=w.device)

    def sorted_call(x):  # the same layer and adapters, the sorted plan forced
        layer.backend = SORTED
        try:
            return layer(x, adapter_ids=ids)
        finally:
            layer.backend = "auto"

    t = {"base": timer(lambda x: nn.functional.linear(x, w), ring),
         "mixed": timer(lambda x: layer(x, adapter_ids=ids), ring), "mixed_sorted": timer(sorted_call, ring)}
    with torch.no_grad():  # the mixed layer computes each row with its own adapter
        x = ring[0]
        As = [a.lora_A for a in layer.adapters.values()]
        Bs = [a.lora_B for a in layer.adapters.values()]
        expect = torch.stack([nn.functional.linear(x[i], w) + 2.0 * nn.functional.linear(
            nn.functional.linear(x[i], As[i]), Bs[i]) for i in range(adapters)])
        torch.testing.assert_close(layer(x, adapter_ids=ids).float(), expect.float(), rtol=3e-2, atol=3e-2)
    floor = 1 + adapters * r * (K + N) / (K * N)
    return {"M": adapters, "K": K, "N": N, "r": r, "adapters": adapters, "base_us": round(t["base"], 2),
            "mixed_us": round(t["mixed"], 2), "mixed_vs_base": round(t["mixed"] / t["base"], 3),
            "mixed_sorted_us": round(t["mixed_sorted"], 2),
            "mixed_sorted_vs_base": round(t["mixed_sorted"] / t["base"], 3),
            "bytes_floor": round(floor, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", default="1,2,4,8,16", help="rows (the default: one per variant of the decode kernel)")
    ap.add_argument("--KN", default="4096x4096,4096x14336,14336x4096")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=32, help="mixed-batch decode: requests = adapters (0: skip)")
    ap.add_argument("--out", default=None, help="folder for decode.csv (and decode_mixed.csv)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.decode needs a GPU")
        return 0
    dev, dt = torch.device("cuda"), torch.bfloat16
    bw = copy_bandwidth(dev)
    print(f"{torch.cuda.get_device_name()}: device copy bandwidth {bw / 1e12:.2f} TB/s; bf16, r={args.r}, "
          f"GPU time per call (CUDA graphs of {CALLS} calls)")
    rows = []
    torch.manual_seed(0)
    with torch.no_grad():
        for kn in args.KN.split(","):
            K, N = map(int, kn.split("x"))
            w = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
            a = torch.randn(args.r, K, device=dev, dtype=dt) / K**0.5
            b = torch.randn(N, args.r, device=dev, dtype=dt) / args.r**0.5
            fns = providers(w, a, b, 2.0)
            for M in map(int, args.M.split(",")):
                ring = [torch.randn(M, K, device=dev, dtype=dt) for _ in range(4)]
                t = {}
                for name, fn in fns.items():
                    try:
                        t[name] = graph_time_us(fn, ring)
                    except Exception as e:  # report and go on: one provider must not take the table down
                        print(f"  {name} M={M} K={K} N={N}: {type(e).__name__}: {str(e)[:200]}")
                w_bytes = w.numel() * w.element_size()
                line = {"M": M, "K": K, "N": N, "r": args.r, **{f"{k}_us": round(v, 2) for k, v in t.items()}}
                for name in ("auto",) + FORWARDS:
                    if name in t:
                        line[f"{name}_vs_merged"] = round(t[name] / t["merged"], 3)
                        line[f"{name}_W0_bw_frac"] = round(w_bytes / (t[name] * 1e-6) / bw, 3)
                line["merged_W0_bw_frac"] = round(w_bytes / (t["merged"] * 1e-6) / bw, 3)
                if "dora" in t and "auto" in t:  # DoRA's decode against LoRA's (target <= 1.1)
                    line["dora_vs_lora"] = round(t["dora"] / t["auto"], 3)
                for name in ("qlora_auto", "qlora_quantized"):  # QLoRA: speedup over bitsandbytes + PEFT's LoRA
                    if name in t and "bnb+eager" in t:
                        line[f"{name}_speedup_vs_bnb"] = round(t["bnb+eager"] / t[name], 3)
                rows.append(line)
                print("  " + "  ".join(f"{k}={v}" for k, v in line.items()))
    mixed_rows = []
    if args.adapters and backends.BACKENDS["triton"].unavailable_reason(dev, dt) is None:
        print(f"mixed-batch decode: {args.adapters} one-token requests on {args.adapters} adapters of r={args.r}")
        with torch.no_grad():
            for kn in args.KN.split(","):
                K, N = map(int, kn.split("x"))
                w = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
                ring = [torch.randn(args.adapters, K, device=dev, dtype=dt) for _ in range(4)]
                try:
                    mixed_rows.append(mixed_decode_row(w, args.r, args.adapters, ring))
                    print("  " + "  ".join(f"{k}={v}" for k, v in mixed_rows[-1].items()))
                except Exception as e:
                    print(f"  mixed K={K} N={N}: {type(e).__name__}: {str(e)[:200]}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for name, table in (("decode.csv", rows), ("decode_mixed.csv", mixed_rows)):
            if table:
                keys = sorted({k for r in table for k in r},
                              key=lambda k: list(table[0]).index(k) if k in table[0] else 99)
                with open(os.path.join(args.out, name), "w", newline="") as f:
                    wr = csv.DictWriter(f, fieldnames=keys)
                    wr.writeheader()
                    wr.writerows(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
