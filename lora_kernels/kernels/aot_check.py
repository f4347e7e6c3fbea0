"""Compile every shipped kernel specialization for a GPU architecture, without a GPU.

    python -m lora_kernels.kernels.aot_check --arch 90 [--arch 80] [--jobs 2]

Uses ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, which runs the whole
pipeline down to a cubin: it catches what the CPU interpreter cannot (a tl.dot with K < 16, layouts the
backend rejects), and the shared memory each specialization needs is checked against the architecture's
limit. Must run with TRITON_INTERPRET unset (the interpreter replaces the kernels' JIT functions).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from concurrent.futures import ProcessPoolExecutor

# Shared memory per block, opt-in maximum (bytes).
SMEM_LIMIT = {80: 166912, 90: 232448}
DTYPES = ("fp16", "bf16", "fp32")
_POINTER_TYPES = {"XA": "*fp32", "SEED": "*i64", "DA": "*fp32", "DB": "*fp32"}
_FLOAT_ARGS = {"scaling", "keep_scale"}
_SIZE_ARGS = {"M", "N", "K", "R"}  # upper case like the pointers, but i32


def _kernels():
    from . import backward, forward

    return {
        "lora_fwd_kernel": forward.lora_fwd_kernel,
        "lora_xa_kernel": forward.lora_xa_kernel,
        "lora_bwd_dx_kernel": backward.lora_bwd_dx_kernel,
        "lora_bwd_ab_kernel": backward.lora_bwd_ab_kernel,
    }


def specializations(arch: int):
    """(kernel name, dtype, constexprs, num_warps, num_stages) for every variant the launchers can pick on `arch`."""
    from .configs import TABLES

    out = []
    for elem_bytes, dtypes in ((2, ("fp16", "bf16")), (4, ("fp32",))):
        for (bm, bn, bk, warps, stages, max_r), dtype in itertools.product(TABLES["gemm"][arch][elem_bytes], dtypes):
            tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
            for br, fuse, bias in ((16, True, True), (min(64, max_r), True, False), (16, False, True)):
                out.append(("lora_fwd_kernel", dtype, dict(tile, HAS_BIAS=bias, FUSE_XA=fuse, STORE_XA=True,
                                                           BLOCK_R=br, DOT_PRECISION="ieee", UPCAST=False),
                            warps, stages))
            for br in sorted({16, max_r}):
                for dropout, det in ((False, False), (True, dtype != "fp16")):
                    out.append(("lora_bwd_dx_kernel", dtype, dict(tile, DROPOUT=dropout, DETERMINISTIC=det,
                                                                  BLOCK_R=br, DOT_PRECISION="ieee", UPCAST=False),
                                warps, stages))
        for (bm, bn, bk, warps, stages, max_r), dtype in itertools.product(TABLES["thin"][arch][elem_bytes], dtypes):
            for br in sorted({16, min(128, max_r)}):
                for dropout in (False, True):
                    out.append(("lora_xa_kernel", dtype, dict(BLOCK_M=bm, BLOCK_K=bk, DROPOUT=dropout, BLOCK_R=br,
                                                              DOT_PRECISION="ieee", UPCAST=False), warps, stages))
            for br in sorted({16, max_r}):
                for dropout, det in ((False, False), (True, dtype != "fp16")):
                    out.append(("lora_bwd_ab_kernel", dtype, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                                                                  DROPOUT=dropout, DETERMINISTIC=det, BLOCK_R=br,
                                                                  DOT_PRECISION="ieee", UPCAST=False),
                                warps, stages))
    return out


def _signature(jit_fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for param in jit_fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.isupper() and name not in _SIZE_ARGS:
            sig[name] = _POINTER_TYPES.get(name, f"*{dtype}")
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_one(arch: int, spec) -> tuple[str, int, float]:
    """Compile one specialization; returns (description, shared memory bytes, seconds). Raises on failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, dtype, constexprs, warps, stages = spec
    kernel = _kernels()[name]
    jit_fn = kernel.fn  # the autotuner wraps the JIT function
    src = ASTSource(fn=jit_fn, signature=_signature(jit_fn, dtype, constexprs), constexprs=constexprs)
    t0 = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    desc = f"sm_{arch} {name} {dtype} warps={warps} stages={stages} {constexprs}"
    smem = compiled.metadata.shared
    if smem > SMEM_LIMIT[arch]:
        raise RuntimeError(f"{desc}: needs {smem} bytes of shared memory, sm_{arch} has {SMEM_LIMIT[arch]}")
    return desc, smem, time.time() - t0


def _run(args):
    arch, spec = args
    try:
        return True, compile_one(arch, spec)
    except Exception as e:  # reported with the specialization, counted as a failure
        return False, f"sm_{arch} {spec[0]} {spec[1]} {spec[2]}: {type(e).__name__}: {e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SMEM_LIMIT))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=0, help="compile only the first N per arch (smoke runs)")
    args = parser.parse_args(argv)
    import triton

    if not isinstance(_kernels()["lora_fwd_kernel"].fn, triton.runtime.JITFunction):
        print("aot_check: TRITON_INTERPRET is set; unset it to compile for a GPU", file=sys.stderr)
        return 2
    jobs = [(arch, s) for arch in (args.arch or [80, 90])
            for s in (specializations(arch)[: args.limit] if args.limit else specializations(arch))]
    failures, t0 = [], time.time()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for ok, result in pool.map(_run, jobs):
            if ok:
                desc, smem, secs = result
                print(f"ok   {secs:5.2f}s smem={smem:6d}  {desc}")
            else:
                failures.append(result)
                print(f"FAIL {result}")
    print(f"{len(jobs) - len(failures)} compiled, {len(failures)} failed in {time.time() - t0:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
