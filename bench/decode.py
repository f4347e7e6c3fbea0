"""Decode-size forward (M <= 16 rows): the CUDA C++ one-pass kernel against the merged-weight GEMV, the base GEMV,
PEFT-style eager LoRA and the Triton backend, timed as GPU time (CUDA graphs of back-to-back calls: at these sizes
one call is ~10 us of GPU work and several times that of host time). Reports the effective W0 bandwidth against the
card's measured copy bandwidth. Needs a GPU.

    python -m bench.decode [--M 1,4,16] [--KN 4096x4096,4096x14336,14336x4096] [--r 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import os

import torch
from torch import nn

from lora_kernels import backends, lora_linear

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


def providers(w, a, b, scaling):
    merged = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    out = {
        "base": lambda x: nn.functional.linear(x, w),
        "merged": lambda x: nn.functional.linear(x, merged),
        "eager": lambda x: nn.functional.linear(x, w) + nn.functional.linear(nn.functional.linear(x, a), b) * scaling,
    }
    for name in ("triton", "cuda"):
        reason = backends.BACKENDS[name].unavailable_reason(w.device, w.dtype)
        if reason:
            print(f"{name}: unavailable ({reason})")
            continue
        out[name] = (lambda be: lambda x: lora_linear(x, w, None, a, b, scaling, backend=be))(name)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", default="1,4,16")
    ap.add_argument("--KN", default="4096x4096,4096x14336,14336x4096")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--out", default=None, help="folder for decode.csv")
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
                for name in ("cuda", "triton"):
                    if name in t:
                        line[f"{name}_vs_merged"] = round(t[name] / t["merged"], 3)
                        line[f"{name}_W0_bw_frac"] = round(w_bytes / (t[name] * 1e-6) / bw, 3)
                line["merged_W0_bw_frac"] = round(w_bytes / (t["merged"] * 1e-6) / bw, 3)
                rows.append(line)
                print("  " + "  ".join(f"{k}={v}" for k, v in line.items()))
    if args.out and rows:
        os.makedirs(args.out, exist_ok=True)
        keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
        with open(os.path.join(args.out, "decode.csv"), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=keys)
            wr.writeheader()
            wr.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
