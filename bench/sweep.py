"""Tile-config sweep of the Triton kernels on the running GPU (a tuning aid, not part of the benchmark).

    python -m bench.sweep [--configs] [--out DIR]

By default it times every forward and backward variant the planner weighs (lora_kernels/plan.py: the Triton ones, the
ATen composition, the CUDA C++ ones where built), as the planner times them, at a few LLM shapes, next to cuBLAS.
With --configs, for each shape it times each candidate tile config of the forward (fused one-launch, xa-first GEMM
part, and the same kernel with r = 0, i.e. a plain GEMM) and of the dX backward, next to cuBLAS and the composite
"cuBLAS GEMM + thin Triton LoRA kernels" path, and prints one table per shape. The numbers feed the config tables
in lora_kernels/kernels/configs.py and the planner's static defaults.
"""

import argparse
import csv
import os
import sys

import torch
import triton

from lora_kernels.kernels import backward as bwd
from lora_kernels.kernels import forward as fwd

SHAPES = [(8192, 4096, 4096, 16), (4096, 4096, 14336, 16), (1024, 4096, 4096, 16), (128, 4096, 4096, 16),
          (16, 4096, 4096, 16), (1, 4096, 4096, 16), (8192, 4096, 4096, 64)]
GEMM = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4), (64, 128, 64, 4, 4),
        (64, 64, 128, 4, 4), (32, 64, 128, 4, 4), (16, 64, 128, 4, 4), (16, 32, 256, 2, 4),
        (16, 128, 128, 4, 4), (16, 64, 256, 4, 3)]
DX = [(128, 64, 256, 8, 3), (128, 64, 128, 8, 4), (128, 64, 128, 4, 4), (64, 64, 128, 4, 4),
      (128, 128, 128, 8, 3), (128, 64, 256, 8, 4), (64, 64, 256, 4, 4), (128, 32, 256, 8, 4)]


def ms(fn):
    fn()  # autotuning and compilation happen here, outside the timed region
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=5, rep=30)


def host_overhead():
    """Time per call of tiny layers, where the GPU work is negligible: what the Python path costs."""
    import time

    from lora_kernels.ops import lora_linear
    out = []
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(1, 256, device=dev, dtype=dt)
    W = torch.randn(256, 256, device=dev, dtype=dt)
    A = torch.randn(16, 256, device=dev, dtype=dt, requires_grad=True)
    B = torch.randn(256, 16, device=dev, dtype=dt, requires_grad=True)
    calls = {"eager": lambda: torch.nn.functional.linear(x, W) + 2.0 * ((x @ A.t()) @ B.t()),
             "base": lambda: torch.nn.functional.linear(x, W)}
    for be in ("torch", "triton"):
        calls[be] = lambda be=be: lora_linear(x, W, None, A, B, 2.0, backend=be)
    print("\n== host time per call, 1 x 256 x 256, r=16 (us)")
    for name, f in calls.items():
        for mode in ("fwd_nograd", "fwd+bwd"):
            def step():
                if mode == "fwd_nograd":
                    with torch.no_grad():
                        f()
                elif name != "base":
                    f().float().sum().backward()
                else:
                    f().float().sum()
            for _ in range(20):
                step()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(200):
                step()
            torch.cuda.synchronize()
            us = (time.perf_counter() - t) / 200 * 1e6
            print(f"  {name:8s} {mode:10s} {us:8.1f}")
            out.append(dict(M=1, K=256, N=256, r=16, what=f"host_{name}_{mode}", us=round(us, 1), ratio=0))
    return out


def _inputs(M, K, N, r, dev="cuda", dt=torch.bfloat16):
    """Seeded bf16 operands of one shape: x, W0, A, B, dY and a dropout seed."""
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=dt, generator=g)
    W = torch.randn(N, K, device=dev, dtype=dt, generator=g) / K**0.5
    A = torch.randn(r, K, device=dev, dtype=dt, generator=g) / K**0.5
    B = torch.randn(N, r, device=dev, dtype=dt, generator=g)
    dy = torch.randn(M, N, device=dev, dtype=dt, generator=g)
    return x, W, A, B, dy, torch.tensor([1234], device=dev, dtype=torch.int64)


def variants(ms_list=(1, 16, 128, 512, 1024, 2048, 4096, 8192)):
    """Every forward and backward variant the planner weighs, bf16, p = 0 and 0.1, timed as the planner times them
    (lora_kernels.plan.tune: back-to-back calls between CUDA events, host launch cost included), next to cuBLAS."""
    from lora_kernels import plan

    rows = []
    dev = torch.device("cuda", torch.cuda.current_device())
    for M in ms_list:
        for K, N, r in ((4096, 4096, 16), (4096, 14336, 16), (4096, 4096, 64)):
            if r == 64 and M not in (1, 1024, 8192):
                continue
            x, W, A, B, dy, seed = _inputs(M, K, N, r)
            res = {"cublas_fwd": ms(lambda: torch.mm(x, W.t())), "cublas_dx": ms(lambda: torch.mm(dy, W))}
            for p in (0.0, 0.1):
                chosen, us = plan.tune(plan.Call(dev, torch.bfloat16, M, K, N, r, p > 0, 2, False))
                for label, t in us.items():
                    if isinstance(t, float):
                        kind, name = label.split(":")
                        res[f"{'fwd' if kind == 'forward' else 'bwd'}_{name}_p{p}"] = t / 1e3
                res[f"plan_p{p}"] = chosen.spec
            line = " ".join(f"{k}={v * 1e3:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items())
            print(f"M={M} K={K} N={N} r={r} (us): {line}", flush=True)
            for k, v in res.items():
                if not isinstance(v, float):
                    continue
                base = res["cublas_dx"] if k.startswith(("bwd", "cublas_dx")) else res["cublas_fwd"]
                rows.append(dict(M=M, K=K, N=N, r=r, what=k, us=round(v * 1e3, 2), ratio=round(v / base, 4)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--configs", action="store_true", help="time tile configs instead of variants")
    ap.add_argument("--M", help="comma-separated M values for the variant sweep")
    args = ap.parse_args(argv)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    ms_list = tuple(int(m) for m in args.M.split(",")) if args.M else None
    rows = [] if args.configs else (variants(ms_list) if ms_list else variants())
    for M, K, N, r in (SHAPES if args.configs else []):
        dev, dt = "cuda", torch.bfloat16
        x, W, A, B, dy, seed = _inputs(M, K, N, r)
        s = 2.0
        y = torch.empty(M, N, device=dev, dtype=dt)
        xa = (x.float() @ A.float().t()).contiguous()
        br = fwd.block_r(r)
        res = {"cublas_fwd": ms(lambda: torch.mm(x, W.t())), "cublas_dx": ms(lambda: torch.mm(dy, W))}
        res["eager_fwd"] = ms(lambda: torch.mm(x, W.t()) + s * ((x @ A.t()) @ B.t()))
        xa_b = xa.to(dt)

        def composite():
            out = torch.mm(x, W.t())
            out.addmm_(xa_b, B.t(), alpha=s)
            return out
        res["cublas+addmm_fwd"] = ms(composite)
        for p in (0.0, 0.1):
            sd = seed if p > 0 else None
            res[f"xa_kernel_p{p}"] = ms(lambda: fwd.launch_xa(x, A, xa, None, sd, s, p))
        for cfg in GEMM:
            bm, bn, bk, w, st = cfg
            if M >= 256 and bm < 64 or M <= 16 and bm > 64:
                continue
            grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
            for name, fuse, R in (("fused", True, r), ("xa_first_gemm", False, r), ("plain_gemm", False, 0)):
                def run(fuse=fuse, R=R):
                    fwd.lora_fwd_kernel.fn[grid](
                        x, W, x, A, B, xa, y, x, x, x, M, N, K, R,
                        x.stride(0), x.stride(1), W.stride(0), W.stride(1), A.stride(0), A.stride(1),
                        B.stride(0), B.stride(1), 0, xa.stride(0), y.stride(0), y.stride(1), s, 1,
                        HAS_BIAS=False, FUSE_XA=fuse, STORE_XA=True, SORTED=False, BLOCK_R=br, DOT_PRECISION="ieee",
                        UPCAST=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=st)
                try:
                    res[f"fwd_{name}_{cfg}"] = ms(run)
                except Exception as e:  # out of resources etc.
                    res[f"fwd_{name}_{cfg}"] = float("nan")
                    print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
        dx = torch.empty(M, K, device=dev, dtype=dt)
        for cfg in DX:
            bm, bn, bk, w, st = cfg
            if M <= 16 and bm > 64:
                continue
            grid = (triton.cdiv(M, bm) * triton.cdiv(K, bk),)
            da = torch.zeros(1, r, K, device=dev, dtype=torch.float32)
            db = torch.zeros(1, N, r, device=dev, dtype=torch.float32)
            for p in (0.0, 0.1):
                th, ks = fwd.dropout_args(p)

                def run(p=p, th=th, ks=ks):
                    bwd.lora_bwd_dx_kernel.fn[grid](
                        dy, W, A, B, x, xa, seed, dx, da, db, M, N, K, r,
                        dy.stride(0), dy.stride(1), W.stride(0), W.stride(1), A.stride(0), A.stride(1),
                        B.stride(0), B.stride(1), x.stride(0), x.stride(1), xa.stride(0), dx.stride(0),
                        dx.stride(1), 0, 0, s, th, ks, 1, DROPOUT=p > 0, DETERMINISTIC=False, BLOCK_R=br,
                        DOT_PRECISION="ieee", UPCAST=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                        num_warps=w, num_stages=st)
                try:
                    res[f"dx_p{p}_{cfg}"] = ms(run)
                except Exception as e:
                    res[f"dx_p{p}_{cfg}"] = float("nan")
                    print(f"  dx {cfg}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
        print(f"\n== M={M} K={K} N={N} r={r} bf16  ({torch.cuda.get_device_name()})")
        base_f, base_b = res["cublas_fwd"], res["cublas_dx"]
        for k, v in res.items():
            base = base_b if k.startswith(("dx", "cublas_dx")) else base_f
            print(f"  {k:48s} {v * 1e3:9.1f} us  {v / base:6.3f}x cuBLAS")
            rows.append(dict(M=M, K=K, N=N, r=r, what=k, us=round(v * 1e3, 2), ratio=round(v / base, 4)))
        sys.stdout.flush()
    rows += host_overhead()
    if not rows:
        return
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "sweep.csv"), "w", newline="") as f:
            wr = csv.DictWriter(f, fieldnames=list(rows[0]))
            wr.writeheader()
            wr.writerows(rows)


if __name__ == "__main__":
    main()
