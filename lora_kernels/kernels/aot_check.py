"""Compile every shipped kernel specialization for a GPU architecture, without a GPU.

    python -m lora_kernels.kernels.aot_check --arch 90 [--arch 80] [--jobs 2]

Uses ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, which runs the whole
pipeline down to a cubin: it catches what the CPU interpreter cannot (a tl.dot with K < 16, layouts the
backend rejects), and the shared memory each specialization needs is checked against the architecture's
limit. The cubin's registers and local memory (register spills) are read with cuobjdump; a specialization
spilling more than MAX_LOCAL_BYTES per thread fails (ptxas then often collapses to 32 registers and a stack
of kilobytes: a kernel that would crawl, whatever the autotuner's other choices). On sm_90, 16-bit
specializations whose tiles span a warpgroup (BLOCK_M >= 64, warps a multiple of 4) must issue Hopper's
wgmma: a change (in a kernel or in Triton) that falls back to Ampere's mma.sync there fails too. Must run with
TRITON_INTERPRET unset (the interpreter replaces the kernels' JIT functions).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# Shared memory per block, opt-in maximum (bytes).
SMEM_LIMIT = {80: 166912, 90: 232448}
# Local memory per thread (bytes) a shipped specialization may use for register spills. Modest spills (a few
# hundred bytes, mostly in prologues and epilogues) are common at 255 registers and left to the autotuner.
MAX_LOCAL_BYTES = 2048
DTYPES = ("fp16", "bf16", "fp32")
# "bf16+fp32": bf16 activations and weights with fp32 master adapters (A, B), which the one-launch forward, the thin
# xa kernel and the low-rank backward round as they load them (the launchers of the others cast A / B first)
_ADAPTER_ARGS = {"A", "B", "L"}
_POINTER_TYPES = {"XA": "*fp32", "SEED": "*i64", "DA": "*fp32", "DB": "*fp32", "OUT": "*i8", "IDS": "*i32",
                  "OWNER": "*i32", "SCALES": "*fp32", "THR": "*i32", "KS": "*fp32", "ORDER": "*i32",
                  "RSTART": "*i32", "WA": "*fp32", "SQ": "*fp32", "G": "*fp32", "DM": "*fp32", "CODE": "*fp32",
                  "ABSMAX2": "*fp32", "CODE2": "*fp32", "GATHER": "*i64", "LO": "*fp32", "TILE_EXPERT": "*i32",
                  "TILE_START": "*i32", "OFFSETS": "*i32"}
# pointers whose type follows the kernel (the dropout mask kernel writes int8; dropout_apply writes x's type)
_KERNEL_POINTERS = {"dropout_apply_kernel": {"OUT": None}, "experts_gemm_kernel": {"OUT": None},
                    "experts_shrink_kernel": {"OUT": "*fp32"}, "experts_lowrank_grad_kernel": {"OUT": "*fp32"}}
# the constexpr that is the dots' M tile, where it is not BLOCK_M (the wgmma check reads it)
_DOT_ROWS = {"experts_lowrank_grad_kernel": "BLOCK_C"}
_FLOAT_ARGS = {"scaling", "scale", "keep_scale", "offset"}
_SIZE_ARGS = {"M", "N", "K", "R", "C"}  # upper case like the pointers, but i32


def _kernels():
    from . import backward, dora, dropout, experts, forward, quantized

    return {
        "lora_fwd_kernel": forward.lora_fwd_kernel,
        "lora_xa_kernel": forward.lora_xa_kernel,
        "lora_bwd_dx_kernel": backward.lora_bwd_dx_kernel,
        "lora_bwd_lowrank_kernel": backward.lora_bwd_lowrank_kernel,
        "dropout_mask_kernel": dropout.dropout_mask_kernel,
        "dropout_apply_kernel": dropout.dropout_apply_kernel,
        "dora_norm_kernel": dora.dora_norm_kernel,
        "dora_scale_kernel": dora.dora_scale_kernel,
        "dora_grad_kernel": dora.dora_grad_kernel,
        "dequantize_kernel": quantized.dequantize_kernel,
        "lora_fwd_quantized_kernel": quantized.lora_fwd_quantized_kernel,
        "experts_shrink_kernel": experts.experts_shrink_kernel,
        "experts_gemm_kernel": experts.experts_gemm_kernel,
        "experts_lowrank_grad_kernel": experts.experts_lowrank_grad_kernel,
    }


def specializations(arch: int):
    """(kernel name, dtype, constexprs, num_warps, num_stages) covering what the launchers can pick on `arch`:
    every config row in every dtype in its base variant, and every flag (bias, fused xa, dropout,
    determinism, widest rank padding) on every row in bf16 and fp32. fp16 shares bf16's code paths but for
    the element type, so its flag variants are not compiled separately."""
    from .configs import TABLES, TILE_KEYS, XA_TILE_KEYS, config_of

    out = []

    def add(kernel, dtype, row, flags, keys=TILE_KEYS, precision="ieee"):
        config = config_of(row, keys)  # the very config the autotuner would launch
        out.append((kernel, dtype, dict(config.kwargs, **flags, DOT_PRECISION=precision, UPCAST=False),
                    config.num_warps, config.num_stages))

    for elem_bytes, dtypes in ((2, ("fp16", "bf16")), (4, ("fp32",))):
        for dtype in dtypes:
            full = dtype != "fp16"
            for row in TABLES["gemm"][arch][elem_bytes]:
                add("lora_fwd_kernel", dtype, row, dict(HAS_BIAS=True, FUSE_XA=True, STORE_XA=True, SORTED=False,
                                                        BLOCK_R=16))
                if dtype == "bf16":  # fp32 master adapters (the one-launch forward; the others get B cast first)
                    add("lora_fwd_kernel", "bf16+fp32", row, dict(HAS_BIAS=True, FUSE_XA=True, STORE_XA=True,
                                                                  SORTED=False, BLOCK_R=min(64, row[5])))
                if full:
                    add("lora_fwd_kernel", dtype, row, dict(HAS_BIAS=False, FUSE_XA=True, STORE_XA=True, SORTED=False,
                                                            BLOCK_R=min(64, row[5])))
                    add("lora_fwd_kernel", dtype, row, dict(HAS_BIAS=True, FUSE_XA=False, STORE_XA=True, SORTED=False,
                                                            BLOCK_R=16))
                    # mixed batches, sorted variant
                    add("lora_fwd_kernel", dtype, row, dict(HAS_BIAS=True, FUSE_XA=False, STORE_XA=True, SORTED=True,
                                                            BLOCK_R=16))
            for row in TABLES["dx"][arch][elem_bytes]:
                add("lora_bwd_dx_kernel", dtype, row, dict(DROPOUT=False, DETERMINISTIC=False, BLOCK_R=16))

                if full:
                    add("lora_bwd_dx_kernel", dtype, row, dict(DROPOUT=True, DETERMINISTIC=False, BLOCK_R=row[5]))
                    add("lora_bwd_dx_kernel", dtype, row, dict(DROPOUT=True, DETERMINISTIC=True, BLOCK_R=16))
            for row in TABLES["thin"][arch][elem_bytes]:
                add("lora_xa_kernel", dtype, row, dict(DROPOUT=False, STORE_XS=True, GATED=False, SPLIT_K=False,
                                                       SORTED=False, BLOCK_R=16), XA_TILE_KEYS)
                if dtype == "bf16":  # fp32 master adapters: every thin row, the widest rank it serves
                    add("lora_xa_kernel", "bf16+fp32", row, dict(DROPOUT=True, STORE_XS=False, GATED=False,
                                                                 SPLIT_K=True, SORTED=False,
                                                                 BLOCK_R=min(128, row[5])), XA_TILE_KEYS)
                    add("lora_bwd_lowrank_kernel", "bf16+fp32", row,
                        dict(DROPOUT=True, DETERMINISTIC=False, NEED_DX=True, GATED=False, BLOCK_R=row[5]))
                add("lora_bwd_lowrank_kernel", dtype, row,
                    dict(DROPOUT=False, DETERMINISTIC=False, NEED_DX=True, GATED=False, BLOCK_R=16))
                if full:
                    add("lora_xa_kernel", dtype, row, dict(DROPOUT=True, STORE_XS=False, GATED=False, SPLIT_K=False,
                                                           SORTED=False, BLOCK_R=min(128, row[5])), XA_TILE_KEYS)
                    add("lora_xa_kernel", dtype, row, dict(DROPOUT=True, STORE_XS=False, GATED=False, SPLIT_K=True,
                                                           SORTED=False, BLOCK_R=min(128, row[5])), XA_TILE_KEYS)
                    add("lora_bwd_lowrank_kernel", dtype, row,
                        dict(DROPOUT=True, DETERMINISTIC=False, NEED_DX=True, GATED=False, BLOCK_R=row[5]))
                    add("lora_bwd_lowrank_kernel", dtype, row,
                        dict(DROPOUT=True, DETERMINISTIC=True, NEED_DX=False, GATED=False, BLOCK_R=16))
                    # mixed batches: the gated variants
                    add("lora_xa_kernel", dtype, row, dict(DROPOUT=True, STORE_XS=True, GATED=True, SPLIT_K=False,
                                                           SORTED=False, BLOCK_R=min(128, row[5])), XA_TILE_KEYS)
                    add("lora_xa_kernel", dtype, row, dict(DROPOUT=True, STORE_XS=False, GATED=True, SPLIT_K=True,
                                                           SORTED=False, BLOCK_R=min(128, row[5])), XA_TILE_KEYS)
                    for split in (False, True):  # the sorted variant (no dropout)
                        add("lora_xa_kernel", dtype, row, dict(DROPOUT=False, STORE_XS=False, GATED=True,
                                                               SPLIT_K=split, SORTED=True, BLOCK_R=min(128, row[5])),
                            XA_TILE_KEYS)
                    add("lora_bwd_lowrank_kernel", dtype, row,
                        dict(DROPOUT=True, DETERMINISTIC=False, NEED_DX=True, GATED=True, BLOCK_R=row[5]))
    # QLoRA: the forward over a quantized W0 (16-bit) and the dequantization pass (every dtype), for each storage:
    # 4-bit with fp32 absmax, 4-bit with double-quantized absmax, int8
    storages = (dict(INT8=False, NESTED=False), dict(INT8=False, NESTED=True), dict(INT8=True, NESTED=False))
    for dtype in ("fp16", "bf16"):
        for row in TABLES["quant"][arch][2]:
            for storage in (storages if dtype == "bf16" else storages[1:2]):
                add("lora_fwd_quantized_kernel", dtype, row, dict(storage, HAS_BIAS=True, BLOCK_R=16,
                                                                  **_blocks(storage)))
    from .quantized import DEQUANT_BLOCK

    for dtype in DTYPES:
        for storage in storages:
            out.append(("dequantize_kernel", dtype, dict(storage, UPCAST=False, BLOCK=DEQUANT_BLOCK,
                                                         **_blocks(storage)), 4, 3))
    from .dora import EW_BLOCK, norm_block
    from .dropout import MASK_BLOCK

    out.append(("dropout_mask_kernel", "fp32", dict(BLOCK_M=MASK_BLOCK[0], BLOCK_K=MASK_BLOCK[1]), 4, 3))
    ew = dict(BLOCK_M=EW_BLOCK[0], BLOCK_N=EW_BLOCK[1], UPCAST=False)
    for dtype in DTYPES:  # the elementwise passes of the aten family and of DoRA
        out.append(("dropout_apply_kernel", dtype, dict(BLOCK_M=MASK_BLOCK[0], BLOCK_K=MASK_BLOCK[1], UPCAST=False),
                    4, 3))
        out.append(("dora_scale_kernel", dtype, dict(ew, HAS_BIAS=True, HAS_EXTRA=True), 4, 3))
        out.append(("dora_grad_kernel", dtype, dict(ew, HAS_REST=True), 4, 3))
        for adapters in (dtype, "fp32"):  # the adapters in W0's dtype, or fp32 masters; every padded rank
            for rank in (16, 32, 64, 128, 256):
                rows, step = norm_block(rank)
                out.append(("dora_norm_kernel", dtype if adapters == dtype else f"{dtype}+fp32",
                            dict(HAS_SQ=False, BLOCK_R=rank, BLOCK_N=rows, BLOCK_K=step), 4, 2))
    out += experts_specializations(arch)
    # fp32 inputs with torch.backends.cuda.matmul.allow_tf32 switch the dots to TF32.
    add("lora_fwd_kernel", "fp32", TABLES["gemm"][arch][4][0],
        dict(HAS_BIAS=True, FUSE_XA=True, STORE_XA=True, SORTED=False, BLOCK_R=16), precision="tf32")
    add("lora_bwd_dx_kernel", "fp32", TABLES["dx"][arch][4][0],
        dict(DROPOUT=True, DETERMINISTIC=False, BLOCK_R=16), precision="tf32")
    return out


def experts_specializations(arch: int) -> list:
    """The MoE experts kernels (16-bit: fp32 experts run the grouped ATen products): each kernel's tile with every
    flag at the narrowest and the widest rank they serve, in bf16, bf16 with fp32 master adapters, and fp16."""
    from .experts import MAX_RANK, TILES

    out = []
    gemm, thin = TILES["gemm"][arch][2], TILES["thin"][arch][2]

    def add(kernel, dtype, row, flags, keys):
        meta = {k: v for k, v in zip(keys, row[:3]) if k is not None}
        out.append((kernel, dtype, dict(meta, **flags, DOT_PRECISION="ieee", UPCAST=False), row[3], row[4]))

    for dtype in ("bf16", "bf16+fp32", "fp16"):
        ranks = (16, MAX_RANK) if dtype != "fp16" else (16,)
        for rank in ranks:
            for gather, bias, dropout in ((True, True, False), (False, False, True)):
                add("experts_gemm_kernel", dtype, gemm, dict(HAS_GATHER=gather, HAS_BIAS=bias, DROPOUT=dropout,
                                                             BLOCK_R=rank), ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                add("experts_shrink_kernel", dtype, thin, dict(HAS_GATHER=gather, DROPOUT=not dropout, BLOCK_R=rank),
                    ("BLOCK_M", None, "BLOCK_K"))
                add("experts_lowrank_grad_kernel", dtype, thin, dict(HAS_GATHER=gather, DROPOUT=gather,
                                                                     BLOCK_R=rank), ("BLOCK_S", "BLOCK_C", None))
    return out


def _blocks(storage: dict) -> dict:
    """The block sizes of a quantized storage as bitsandbytes' defaults set them (64 values per absmax, 256 absmax
    per absmax2); int8 has none."""
    return dict(BLOCKSIZE=1 if storage["INT8"] else 64, BLOCKSIZE2=256 if storage["NESTED"] else 1)


def _signature(jit_fn, dtype: str, constexprs: dict) -> dict:
    dtype, _, adapters = dtype.partition("+")
    own = _KERNEL_POINTERS.get(jit_fn.__name__, {})
    sig = {}
    for param in jit_fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name == "Q":  # a quantized W0: int8 values, or packed 4-bit codes
            sig[name] = "*i8" if constexprs.get("INT8") else "*u8"
        elif name == "ABSMAX":  # 4-bit: fp32, or uint8 with double quantization; int8: the fp32 row scales
            sig[name] = "*u8" if constexprs.get("NESTED") else "*fp32"
        elif name in _ADAPTER_ARGS and adapters:
            sig[name] = f"*{adapters}"
        elif name.isupper() and name not in _SIZE_ARGS:
            fixed = own[name] if name in own else _POINTER_TYPES.get(name)
            sig[name] = fixed or f"*{dtype}"
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def cuobjdump_path() -> str | None:
    """Triton's bundled cuobjdump, else one on the PATH, else None."""
    try:
        import triton

        tool = triton.knobs.nvidia.cuobjdump.path
        if tool and os.path.exists(tool):
            return tool
    except Exception:  # no Triton, an older one without the knob, or no NVIDIA backend
        pass
    return shutil.which("cuobjdump")


def resources(cubin: bytes) -> tuple[int, int] | None:
    """(registers per thread, local memory bytes per thread) of a cubin's kernel, from cuobjdump; None if no
    cuobjdump is found."""
    tool = cuobjdump_path()
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def compile_one(arch: int, spec) -> tuple[str, int, tuple | None, float]:
    """Compile one specialization; returns (description, shared memory bytes, (registers, local bytes) or None,
    seconds). Raises on failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, dtype, constexprs, warps, stages = spec
    kernel = _kernels()[name]
    jit_fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel  # unwrap autotuned kernels
    src = ASTSource(fn=jit_fn, signature=_signature(jit_fn, dtype, constexprs), constexprs=constexprs)
    t0 = time.time()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    desc = f"sm_{arch} {name} {dtype} warps={warps} stages={stages} {constexprs}"
    smem = compiled.metadata.shared
    if smem > SMEM_LIMIT[arch]:
        raise RuntimeError(f"{desc}: needs {smem} bytes of shared memory, sm_{arch} has {SMEM_LIMIT[arch]}")
    if (arch == 90 and dtype != "fp32" and constexprs.get(_DOT_ROWS.get(name, "BLOCK_M"), 0) >= 64 and warps % 4 == 0
            and "wgmma.mma_async" not in compiled.asm["ptx"]):
        raise RuntimeError(f"{desc}: no wgmma in the sm_90 code (its dots fell back to mma.sync)")
    res = resources(compiled.asm["cubin"])
    if res is not None and res[1] > MAX_LOCAL_BYTES:
        raise RuntimeError(f"{desc}: spills {res[1]} bytes of local memory per thread ({res[0]} registers); "
                           f"the limit is {MAX_LOCAL_BYTES} (lower the rank cap of its config row in configs.py)")
    return desc, smem, res, time.time() - t0


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
    failures, spilling, unmeasured, t0 = [], 0, 0, time.time()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for ok, result in pool.map(_run, jobs):
            if ok:
                desc, smem, res, secs = result
                spilling += bool(res and res[1])
                unmeasured += res is None
                usage = f"regs={res[0]:3d} local={res[1]:5d}" if res else "regs=  ? local=    ?"
                print(f"ok   {secs:5.2f}s smem={smem:6d} {usage}  {desc}")
            else:
                failures.append(result)
                print(f"FAIL {result}")
    print(f"spills: {spilling} specializations use local memory (each <= {MAX_LOCAL_BYTES} bytes per thread)"
          + (f"; {unmeasured} not measured (no cuobjdump)" if unmeasured else ""))
    print(f"{len(jobs) - len(failures)} compiled, {len(failures)} failed in {time.time() - t0:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
