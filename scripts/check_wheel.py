"""Checks an installed lora-kernels wheel with the CUDA extension (run by scripts/build_wheel.sh in a fresh venv,
outside the source tree): the wheel's tag (cp310-abi3-manylinux, no local version), it imports, the library of
torch's CUDA major loads into torch.ops and the process maps that major's CUDA runtime (EXPECT_CUDA_MAJOR: the
major the venv's torch must have), its Philox dropout mask is bit-identical to the torch reference, its machine code
(every architecture asked for, spills bounded, the decode kernels' loads in flight), clear errors, and, on a machine
with a GPU, one forward/backward against the reference."""

import os
import re
import sys

import torch

wheel = os.path.basename(sys.argv[1]) if len(sys.argv) > 1 else ""
import lora_kernels  # noqa: E402
from lora_kernels import backends, cuda_ext, plan, reference  # noqa: E402

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


check(not wheel or (re.search(r"-cp310-abi3-manylinux_\d+_\d+_x86_64\.whl$", wheel) is not None and "+" not in wheel),
      f"wheel tag: {wheel} (cp310-abi3-manylinux, no local version label)")
check("site-packages" in lora_kernels.__file__, f"imported from the install: {lora_kernels.__file__}")
major = torch.version.cuda.split(".")[0] if torch.version.cuda else None
expected = os.environ.get("EXPECT_CUDA_MAJOR")
check(not expected or major == expected, f"torch {torch.__version__} has CUDA {torch.version.cuda} (expected {expected})")
built = os.environ.get("EXPECT_LIBRARIES", "12 13").split()  # the majors the wheel holds a library for
shipped = sorted(os.path.basename(p) for p in cuda_ext.prebuilt_libraries())
check(shipped == sorted(f"_C_cu{m}.abi3.so" for m in built), f"the wheel holds {shipped} (CUDA {', '.join(built)})")
if major not in built:  # no library for this torch: one warning, the reason in info(), the other backends serve
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = cuda_ext.load()
    check(reason is not None and f"CUDA {torch.version.cuda}" in reason and len(caught) == 1,
          f"no library for CUDA {major}: warned once ({len(caught)}), reason: {reason}")
    y = lora_kernels.lora_linear(torch.randn(3, 8), torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2), 1.0)
    check(tuple(y.shape) == (3, 4), "backend='auto' serves without the library")
    lora_kernels.info()
    sys.exit(1 if failures else 0)
reason = cuda_ext.load()
check(reason is None, f"extension loaded: {cuda_ext.describe()}")
library = cuda_ext.prebuilt_library()
check(library is not None and "site-packages" in library and os.path.basename(library).startswith(f"_C_cu{major}."),
      f"the library of torch's CUDA {major} shipped in the wheel: {library}")
if reason is None:  # which CUDA runtime the process really maps (a system toolkit on the loader's path would hide a
    # missing one): torch's, of its CUDA major, from its own wheels
    maps = open("/proc/self/maps").read()
    runtimes = sorted({line.split()[-1] for line in maps.splitlines() if "libcudart.so" in line})
    check(bool(runtimes) and all(f"libcudart.so.{major}" in r for r in runtimes),
          f"CUDA runtime mapped: {runtimes}")
check(cuda_ext.built() == (reason is None), f"the planner sees the prebuilt extension (built() = {cuda_ext.built()})")
if reason is None:
    ops = torch.ops.lora_kernels_cuda
    for name in ("forward", "backward", "dropout_mask"):
        check(hasattr(ops, name), f"op lora_kernels_cuda::{name} registered")
    for seed, m, k, p in [(0, 1, 1, 0.5), (7, 3, 13, 0.1), (2**40 + 12345, 37, 130, 0.3), (2**63 - 1, 5, 4, 0.9)]:
        out = torch.full((m, k), 255, dtype=torch.uint8)
        ops.dropout_mask(out, seed, p)
        same = torch.equal(out.bool(), reference.dropout_keep_mask(seed, m, k, p)) and int(out.max()) <= 1
        check(same, f"CUDA Philox mask == reference mask (seed={seed}, {m}x{k}, p={p})")
    try:
        lora_kernels.lora_linear(torch.randn(2, 8), torch.randn(4, 8), None, torch.randn(1, 8), torch.randn(4, 1),
                                 1.0, backend="cuda")
        check(False, "backend='cuda' on CPU tensors raises")
    except backends.BackendUnavailableError as e:
        check("CUDA tensors" in str(e), f"backend='cuda' on CPU tensors raises: {e}")


MAX_LOCAL_BYTES = 256  # per thread: a few spilled values outside the main loops, not accumulators
MIN_STREAMED_LOADS = 4  # per warp and decode-kernel iteration: rows x unrolled steps (csrc/forward_decode.cuh)

if library is not None:
    import subprocess

    from lora_kernels.kernels.aot_check import cuobjdump_path

    tool = cuobjdump_path()
    if tool is None:
        print("skip kernel binaries: no cuobjdump")
    else:
        # machine code for every architecture the build was asked for (LORA_KERNELS_CUDA_ARCHS, as set for the build)
        elves = subprocess.run([tool, "-lelf", library], capture_output=True, text=True).stdout
        built = set(re.findall(r"\.sm_(\w+)\.cubin", elves))
        wanted = {a.strip().replace("sm_", "") for a in os.environ.get("LORA_KERNELS_CUDA_ARCHS", "").split(";")
                  if a.strip()}
        check(bool(built) and wanted <= built, f"machine code for sm_{', sm_'.join(sorted(built))}"
              + (f" (asked: sm_{', sm_'.join(sorted(wanted))})" if wanted else ""))
        # the kernels keep their state in registers: local memory (register spills) past a few values would put
        # accumulators in DRAM-backed memory on every step
        out = subprocess.run([tool, "-res-usage", "-elf", library], capture_output=True, text=True).stdout
        usage, arch, name = [], None, None
        for line in out.splitlines():
            if m := re.search(r"arch = sm_(\w+)", line):
                arch = m.group(1)
            elif m := re.search(r"Function (\S+):", line):
                name = m.group(1)
            elif m := re.search(r"REG:(\d+) STACK:(\d+)", line):
                usage.append((arch, name, int(m.group(1)), int(m.group(2))))
        over = [(a, n, stack) for a, n, _, stack in usage if stack > MAX_LOCAL_BYTES]
        check(bool(usage) and not over,
              f"kernel resources: {len(usage)} kernels, at most {max((u[2] for u in usage), default=0)} registers "
              f"and {max((u[3] for u in usage), default=0)} bytes of local memory per thread (limit "
              f"{MAX_LOCAL_BYTES})" + (f"; over: {over[:3]}" if over else ""))
        # the decode kernels stream W0: each warp must have several 16-byte loads of it in flight at once (bytes in
        # flight = bandwidth x latency). Streamed loads (ld.global.nc.L1::no_allocate, SASS LDG.E.NA.128) issued back
        # to back, before the FMAs or MMAs that use them; a loop that loads a row and then multiplies it has one.
        sass = subprocess.run([tool, "-sass", library], capture_output=True, text=True).stdout
        in_flight = {}
        for arch_part in re.split(r"\n\s*arch = ", sass)[1:]:
            arch_name = arch_part.split()[0]
            for fn in re.split(r"\n\s*Function : ", arch_part)[1:]:
                name = fn.split(None, 1)[0]
                if "lora_forward_decode" not in name:  # both decode kernels (CUDA cores, tensor cores)
                    continue
                best = run = 0
                for op in re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9.]*)", fn):
                    if op.startswith("LDG.E.NA.128"):
                        run += 1
                        best = max(best, run)
                    elif op.startswith(("FFMA", "FMUL", "FADD", "HMMA")):
                        run = 0
                in_flight[arch_name, name] = best
        low = {k: v for k, v in in_flight.items() if v < MIN_STREAMED_LOADS}
        check(bool(in_flight) and not low,
              f"decode kernels: {len(in_flight)}, 16-byte W0 loads in flight per warp "
              f"{min(in_flight.values(), default=0)}-{max(in_flight.values(), default=0)} "
              f"(at least {MIN_STREAMED_LOADS})"
              + (f"; too few: {sorted(low.items())[:3]}" if low else ""))
if torch.cuda.is_available() and reason is None:
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(37, 200, device=dev, dtype=dt, requires_grad=True)
    w, a, b = (torch.randn(*s, device=dev, dtype=dt) * 0.1 for s in ((96, 200), (5, 200), (96, 5)))
    a.requires_grad_(True)
    b.requires_grad_(True)
    y = lora_kernels.lora_linear(x, w, None, a, b, 2.0, backend="cuda")
    y.float().square().sum().backward()
    y64 = reference.lora_forward(*(t.detach().double() for t in (x, w)), None, a.detach().double(),
                                 b.detach().double(), 2.0)[0]
    check(bool(torch.isfinite(y).all()) and float((y.double() - y64).abs().max()) < 0.05 * float(y64.abs().max()),
          "GPU forward close to the fp64 reference")
    check(all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in (x, a, b)), "GPU backward finite")
lora_kernels.info()
sys.exit(1 if failures else 0)
