"""The CUDA C++ backend (csrc/): its build configuration and Philox code everywhere; its kernels on a GPU.

Without a GPU (or without the built extension) the kernel tests skip with the reason; the build itself is checked
by scripts/build_wheel.sh (compile for sm_80 + sm_90a, wheel, fresh venv, import), which CI runs, and the kernels'
code runs on the CPU in tests/test_cuda_emulation.py.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import HAS_GPU, assert_parity, make_inputs, seed_tensor
from lora_kernels import backends, cuda_build, cuda_ext, lora_linear, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


# ---------------------------------------------------------------------------------------------------------------
# Everywhere
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def philox_driver(tmp_path_factory):
    """csrc/philox.h (the code the kernels run) compiled for the host, printing a mask."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler to compile csrc/philox.h")
    d = tmp_path_factory.mktemp("philox")
    src = d / "mask.cpp"
    src.write_text(textwrap.dedent("""
        #include <cstdio>
        #include <cstdlib>
        #include <cmath>
        #include "philox.h"
        int main(int argc, char** argv) {
          unsigned long long seed = strtoull(argv[1], nullptr, 10);
          long long M = atoll(argv[2]), K = atoll(argv[3]);
          unsigned threshold = (unsigned)std::floor(atof(argv[4]) * 2147483648.0);
          for (long long m = 0; m < M; ++m) {
            for (long long k = 0; k < K; ++k) putchar(lora_kernels::keep(seed, m, k, K, threshold) ? '1' : '0');
            putchar('\\n');
          }
        }
    """))
    exe = d / "mask"
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{CSRC}", str(src), "-o", str(exe)], check=True)
    return str(exe)


@pytest.mark.parametrize("seed,M,K,p", [(0, 1, 1, 0.5), (123, 7, 13, 0.1), (2**40 + 99, 37, 130, 0.3),
                                        (2**63 - 1, 4, 4, 0.9), (5, 3, 4097, 0.05)])
def test_philox_header_matches_reference(philox_driver, seed, M, K, p):
    out = subprocess.run([philox_driver, str(seed), str(M), str(K), repr(p)], capture_output=True, text=True,
                         check=True).stdout.split()
    mask = torch.tensor([[c == "1" for c in row] for row in out], dtype=torch.bool)
    ref = reference.dropout_keep_mask(seed, M, K, p)
    assert mask.shape == ref.shape
    assert torch.equal(mask, ref), f"{int((mask != ref).sum())} of {ref.numel()} mask bits differ"


def test_kernel_translation_units_have_no_torch_headers():
    """Only the binding includes torch (thin .cu files build in seconds, not minutes)."""
    for dirpath, _, files in os.walk(CSRC):
        for f in files:
            if f.endswith((".cu", ".cuh", ".h")):
                text = open(os.path.join(dirpath, f)).read()
                assert "#include <torch" not in text and "#include <ATen" not in text and "#include <c10" not in text, f
    sources = cuda_build.sources(ROOT)
    assert "csrc/lora_kernels_cuda.cpp" in sources
    assert len([s for s in sources if s.startswith("csrc/instantiations/")]) == 9  # 3 kernels x 3 dtypes
    for s in sources:
        assert os.path.isfile(os.path.join(ROOT, s)), s


def test_gencode_flags(monkeypatch):
    monkeypatch.setattr(cuda_build, "nvcc_archs", lambda home: {"80", "86", "89", "90", "90a"})
    monkeypatch.delenv("LORA_KERNELS_CUDA_ARCHS", raising=False)
    flags, skipped = cuda_build.gencode_flags("/x")
    pairs = [flags[i + 1] for i in range(0, len(flags), 2)]
    assert pairs == ["arch=compute_80,code=sm_80", "arch=compute_86,code=sm_86", "arch=compute_89,code=sm_89",
                     "arch=compute_90a,code=sm_90a", "arch=compute_90,code=compute_90"] and skipped == []
    monkeypatch.setenv("LORA_KERNELS_CUDA_ARCHS", "sm_80; 100a")
    flags, skipped = cuda_build.gencode_flags("/x")
    assert flags == ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_80,code=compute_80"]
    assert skipped == ["100a"]
    monkeypatch.setenv("LORA_KERNELS_CUDA_ARCHS", "75")
    monkeypatch.setattr(cuda_build, "nvcc_archs", lambda home: {"80"})
    with pytest.raises(RuntimeError, match="supports none"):
        cuda_build.gencode_flags("/x")


def test_nvcc_archs_include_arch_specific_targets(tmp_path):
    """nvcc --list-gpu-arch lists base architectures only (CUDA 13.0: no compute_90a), yet builds sm_90a: the
    arch-specific targets from sm_90 on count as supported, or the default build would skip sm_90a."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"
    nvcc.write_text("#!/bin/sh\nprintf 'compute_75\\ncompute_80\\ncompute_86\\ncompute_90\\ncompute_100\\n'\n")
    nvcc.chmod(0o755)
    assert cuda_build.nvcc_archs(str(tmp_path)) == {"75", "80", "86", "90", "90a", "100", "100a"}
    home = cuda_build.find_cuda_home()
    if home is not None:  # the real one, where present: the build's default targets are all there
        assert {"80", "90a"} <= cuda_build.nvcc_archs(home)


def test_find_cuda_home_sees_through_a_wrapper(tmp_path, monkeypatch):
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    wrapper_dir = tmp_path / "wrap" / "bin"
    wrapper_dir.mkdir(parents=True)
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    for var in ("CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(wrapper_dir))
    assert cuda_build.find_cuda_home() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", "/explicit")
    assert cuda_build.find_cuda_home() == "/explicit"


def test_unavailable_reasons_and_errors(monkeypatch):
    reason = backends.CudaBackend.unavailable_reason(torch.device("cpu"), torch.float32)
    assert "CUDA tensors" in reason
    x, w, b, a, bb = make_inputs(4, 8, 6, 2, torch.float32, device="cpu")
    with pytest.raises(backends.BackendUnavailableError, match="backend 'cuda' cannot run .*CUDA tensors"):
        lora_linear(x, w, b, a, bb, 1.0, backend="cuda")
    monkeypatch.setenv("LORA_KERNELS_CUDA_EXT", "0")
    cuda_ext.load.cache_clear()
    try:
        assert "LORA_KERNELS_CUDA_EXT=0" in cuda_ext.load()
        assert cuda_ext.describe().startswith("unavailable") and not cuda_ext.built()
        monkeypatch.setenv("LORA_KERNELS_CUDA_EXT", "sometimes")
        cuda_ext.load.cache_clear()
        with pytest.raises(ValueError, match="LORA_KERNELS_CUDA_EXT: expected 0 .*got 'sometimes'"):
            cuda_ext.load()
    finally:
        monkeypatch.delenv("LORA_KERNELS_CUDA_EXT")
        cuda_ext.load.cache_clear()
    if not torch.version.cuda:
        assert "CPU build" in cuda_ext.load()
    from lora_kernels import plan

    assert plan.choose(plan.Call(torch.device("cpu"), torch.float32, 4, 8, 6, 2, False, 0, False)).forward == "torch"


def test_setup_installs_pure_python_without_a_toolkit_or_torch():
    env = dict(os.environ, LORA_KERNELS_BUILD_CUDA="0")
    res = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "without the CUDA C++ extension (LORA_KERNELS_BUILD_CUDA=0)" in res.stderr
    import lora_kernels

    assert res.stdout.strip().splitlines()[-1] == lora_kernels.__version__
    env["LORA_KERNELS_BUILD_CUDA"] = "1"
    env["CUDA_HOME"] = "/nonexistent-toolkit"
    env["PATH"] = "/usr/bin:/bin"
    res = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode != 0 or torch.version.cuda  # a CPU torch cannot build it: =1 makes that an error
    if not torch.version.cuda:
        assert "cannot be built" in res.stderr


class _ReferenceOps:
    """Stands in for torch.ops.lora_kernels_cuda with the reference formulas, writing into the given outputs the way
    the kernels do (backward: adds into the zeroed buffers, or fills one partial per 64-row tile): checks the
    backend's allocation, workspace layout, views, partial sums and casts without a GPU."""

    def forward(self, x, w, bias, a, b, seed, y, xa, scaling, p, store_xa, decode):
        M, r = x.shape[0], a.shape[0]
        assert decode == (1 <= M <= 16)
        ry, rxa = reference.lora_forward(x, w, bias, a, b, scaling, p, None if seed is None else int(seed))
        y.copy_(ry)
        if decode:
            assert xa.numel() == M * r + 1 and xa.dtype == torch.float32
            xa.zero_()  # the launcher's memset
            xa[:M * r].copy_(rxa.float().flatten())
        elif store_xa:
            xa.copy_(rxa)

    def backward(self, gy, x, w, a, b, xa, seed, dx, da, db, scaling, p, deterministic):
        rdx, rda, rdb = reference.lora_backward(gy.float(), x.float(), w.float(), a.float(), b.float(), xa, scaling,
                                                p, None if seed is None else int(seed), dx is not None)
        if dx is not None:
            dx.copy_(rdx)
        if deterministic:
            parts = -(-x.shape[0] // 64)
            assert da.shape == (parts, *rda.shape) and db.shape == (parts, *rdb.shape)
            da.copy_((rda / parts).expand_as(da))
            db.copy_((rdb / parts).expand_as(db))
        else:
            da.add_(rda)
            db.add_(rdb)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [0, 1, 16, 17, 150])
@pytest.mark.parametrize("deterministic,need_dx,p", [(False, True, 0.0), (True, True, 0.2), (False, False, 0.2)])
def test_backend_glue_with_reference_ops(monkeypatch, dtype, M, deterministic, need_dx, p):
    monkeypatch.setattr(torch.ops, "lora_kernels_cuda", _ReferenceOps(), raising=False)
    x, w, b, a, bb = make_inputs(M, 40, 24, 3, dtype, device="cpu")
    seed = torch.tensor([77], dtype=torch.int64) if p else None
    cb = backends.CudaBackend
    y, xa = cb.forward(x, w, b, a, bb, seed, 1.5, p, True, decode=1 <= M <= 16)
    ry, rxa = reference.lora_forward(x, w, b, a, bb, 1.5, p, 77)
    assert y.dtype == dtype and xa.dtype == torch.float32 and xa.shape == (M, 3)
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(xa, rxa.float())
    _, empty_xa = cb.forward(x, w, b, a, bb, seed, 1.5, p, False, decode=1 <= M <= 16)
    assert empty_xa.numel() == 0
    gy = torch.randn(M, 24, dtype=dtype)
    dx, da, db = cb.backward(gy, x, w, a, bb, xa, seed, 1.5, p, need_dx, deterministic)
    rdx, rda, rdb = reference.lora_backward(gy.float(), x.float(), w.float(), a.float(), bb.float(), rxa.float(),
                                            1.5, p, 77, need_dx)
    assert da.shape == a.shape and db.shape == bb.shape and da.dtype == db.dtype == dtype
    torch.testing.assert_close(da.float(), rda, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(db.float(), rdb, atol=2e-2, rtol=2e-2)
    if need_dx:
        assert dx.shape == x.shape and dx.dtype == dtype
        torch.testing.assert_close(dx.float(), rdx, atol=2e-2, rtol=2e-2)
    else:
        assert dx.numel() == 0


# ---------------------------------------------------------------------------------------------------------------
# On a GPU, with the extension built
# ---------------------------------------------------------------------------------------------------------------
def _gpu_skip_reason():
    if not HAS_GPU:
        return "needs a CUDA GPU (none on this machine); the build is checked by scripts/build_wheel.sh"
    return backends.CudaBackend.unavailable_reason(torch.device("cuda"), torch.bfloat16)


_GPU_SKIP = _gpu_skip_reason()
gpu = pytest.mark.skipif(_GPU_SKIP is not None, reason=str(_GPU_SKIP))


def _check(M, K, N, r, dtype, p, need_dx=True, deterministic=False, bias=True):
    x, w, b, a, bb = make_inputs(M, K, N, r, dtype, bias=bias)
    x.requires_grad_(need_dx)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    y = lora_linear(x, w, b, a, bb, 1.5, p, backend="cuda", seed=seed_tensor(11))
    gy = torch.randn_like(y)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        y.backward(gy)
    finally:
        torch.use_deterministic_algorithms(prev)
    refs = []
    for dt in (dtype, torch.float64):
        args = [None if t is None else t.detach().to(dt) for t in (x, w, b, a, bb)]
        ry, xa = reference.lora_forward(*args, 1.5, p, 11)
        refs.append((ry, *reference.lora_backward(gy.to(dt), args[0], args[1], args[3], args[4], xa, 1.5, p, 11,
                                                  need_dx)))
    for name, out, same, r64 in zip(("y", "grad x", "grad lora_A", "grad lora_B"), (y, x.grad, a.grad, bb.grad), *refs):
        if same is not None:
            assert_parity(name, out, same, r64)
    return y, x.grad, a.grad, bb.grad


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [0, 1, 16, 17, 37, 300])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_parity(dtype, M, p):
    _check(M, 200, 136, 5, dtype, p)


@gpu
@pytest.mark.parametrize("r", [1, 3, 16, 64, 100, 256])
@pytest.mark.parametrize("M", [2, 130])
def test_ranks(r, M):
    _check(M, 520, 264, r, torch.bfloat16, 0.1)


@gpu
@pytest.mark.parametrize("M", [1, 8, 2048])
def test_llm_shapes(M):
    _check(M, 4096, 4096, 16, torch.bfloat16, 0.0)


@gpu
@pytest.mark.parametrize("M, dtype", [(1, torch.bfloat16), (2, torch.float16), (3, torch.float32), (6, torch.bfloat16),
                                      (13, torch.float16), (16, torch.bfloat16), (16, torch.float32)])
def test_decode_unrolled_loop_tails_and_clamped_rows(M, dtype):
    """Every decode variant: K with its unrolled loop and a tail, N and r not multiples of the rows per item, r > 32;
    and the forward repeats bit for bit (no atomics on values)."""
    outs = []
    for _ in range(2):
        torch.manual_seed(3)  # the same inputs twice
        outs.append(_check(M, 4104, 4099, 37, dtype, 0.1)[0])
    assert torch.equal(*outs)


@gpu
def test_odd_k_scalar_paths():
    _check(19, 101, 77, 3, torch.float16, 0.1, bias=False)  # K, N, r odd: no 16-byte loads anywhere
    _check(5, 101, 77, 3, torch.float16, 0.1, bias=False)


@gpu
def test_lora_only_backward_and_deterministic():
    _check(150, 256, 192, 8, torch.bfloat16, 0.1, need_dx=False)
    torch.manual_seed(1)  # the same inputs twice
    first = _check(150, 256, 192, 8, torch.bfloat16, 0.1, deterministic=True)
    torch.manual_seed(1)
    second = _check(150, 256, 192, 8, torch.bfloat16, 0.1, deterministic=True)
    for u, v in zip(first[1:], second[1:]):
        assert torch.equal(u, v)


@gpu
@pytest.mark.parametrize("M", [3, 16, 37])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_dropout_mask_is_the_reference_mask(M, backend):
    """x = 1, A = B = I, W0 = 0: y is exactly the kept mask times 1/(1-p), decode and tiled kernels alike."""
    K = 32
    eye = torch.eye(K, device="cuda", dtype=torch.float16)
    x = torch.ones(M, K, device="cuda", dtype=torch.float16)
    y = lora_linear(x, torch.zeros_like(eye), None, eye, eye, 1.0, 0.25, backend=backend, seed=seed_tensor(2**40 + 3))
    keep = reference.dropout_keep_mask(2**40 + 3, M, K, 0.25, device="cuda")
    assert torch.equal(y != 0, keep)
    assert torch.equal(y[keep].float(), torch.full_like(y[keep].float(), 1 / 0.75).half().float())


@gpu
def test_cuda_matches_triton():
    x, w, b, a, bb = make_inputs(333, 512, 384, 16, torch.bfloat16)
    y_cuda = lora_linear(x, w, b, a, bb, 2.0, 0.1, backend="cuda", seed=seed_tensor(5))
    y_triton = lora_linear(x, w, b, a, bb, 2.0, 0.1, backend="triton", seed=seed_tensor(5))
    y64 = reference.lora_forward(*(t.double() for t in (x, w, b, a, bb)), 2.0, 0.1, 5)[0]
    assert (y_cuda.double() - y_triton.double()).abs().max() <= 2 * (y_triton.double() - y64).abs().max() + 1e-2


@gpu
def test_bad_inputs_raise_before_launch():
    ops = torch.ops.lora_kernels_cuda
    x, w, b, a, bb = make_inputs(4, 64, 32, 4, torch.float16)
    y = torch.empty(4, 32, device="cuda", dtype=torch.float16)
    xa = torch.empty(4 * 4 + 1, device="cuda")
    with pytest.raises(RuntimeError, match="weight: dtype float32, expected float16"):
        ops.forward(x, w.float(), b, a, bb, None, y, xa, 1.0, 0.0, True, True)
    with pytest.raises(RuntimeError, match="lora_B: expected shape \\[32, 4\\]"):
        ops.forward(x, w, b, a, bb.t().contiguous(), None, y, xa, 1.0, 0.0, True, True)
    with pytest.raises(RuntimeError, match="seed: dropout_p > 0"):
        ops.forward(x, w, b, a, bb, None, y, xa, 1.0, 0.5, True, True)
    with pytest.raises(RuntimeError, match="x: expected a contiguous"):
        ops.forward(x.t().contiguous().t(), w, b, a, bb, None, y, xa, 1.0, 0.0, True, True)
    with pytest.raises(RuntimeError, match="decode kernel needs a workspace"):
        ops.forward(x, w, b, a, bb, None, y, xa[:-1], 1.0, 0.0, True, True)


@gpu
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not on PATH")
def test_compute_sanitizer_clean(tmp_path):
    script = tmp_path / "small.py"
    script.write_text(textwrap.dedent("""
        import torch, lora_kernels
        torch.manual_seed(0)
        for M in (3, 37):
            x = torch.randn(M, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            w = torch.randn(40, 72, device="cuda", dtype=torch.bfloat16)
            a = torch.randn(3, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            b = torch.randn(40, 3, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            y = lora_kernels.lora_linear(x, w, None, a, b, 1.0, 0.1, backend="cuda")
            y.sum().backward()
        torch.cuda.synchronize()
    """))
    res = subprocess.run(["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3", sys.executable,
                          str(script)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and "ERROR SUMMARY: 0 errors" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]


def _nvcc():
    home = cuda_build.find_cuda_home()
    return os.path.join(home, "bin", "nvcc") if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) else None


@pytest.mark.skipif(_nvcc() is None, reason="no CUDA toolkit (nvcc) on this machine")
def test_kernels_use_tensor_cores_and_do_not_spill(tmp_path):
    """The 16-bit kernels' PTX issues tensor-core MMAs, and ptxas keeps every kernel in registers (no local memory).
    The thin .cu files need no torch, so this compiles them directly (sm_80, bf16: ~15 s)."""
    files = ["forward_tiled_bf16.cu", "backward_bf16.cu", "forward_decode_bf16.cu"]
    procs = {}
    for f in files:
        keep = tmp_path / f
        keep.mkdir()
        procs[f] = subprocess.Popen(
            [_nvcc(), "-std=c++17", "-O3", "-arch=sm_80", "-cubin", "-Xptxas", "-v", "--keep", "--keep-dir", str(keep),
             "-o", str(keep / "k.cubin"), os.path.join(CSRC, "instantiations", f)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for f, proc in procs.items():
        log = proc.communicate()[0]
        assert proc.returncode == 0, log[-3000:]
        kernels = [line for line in log.splitlines() if "spill stores" in line]
        assert kernels, log[-2000:]
        for line in kernels:
            assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in line, f"{f}: {line}"
        ptx = "".join(p.read_text() for p in (tmp_path / f).glob("*.ptx"))
        if "decode" not in f:
            assert "wmma.mma.sync" in ptx or "mma.sync" in ptx, f"{f}: no tensor-core MMA in the PTX"


def test_broken_library_warns_once_and_says_why(tmp_path, monkeypatch):
    """A library that exists but does not load (wrong torch, CUDA major mismatch) warns once; import never fails."""
    bogus = tmp_path / "_C.abi3.so"
    bogus.write_bytes(b"not an ELF file")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cuda_ext, "prebuilt_library", lambda: str(bogus))
    monkeypatch.setattr(cuda_ext, "_registered", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("LORA_KERNELS_CUDA_EXT", raising=False)
    cuda_ext.load.cache_clear()
    cuda_ext._load_prebuilt.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="_C.abi3.so could not be loaded") as record:
            first = cuda_ext.load()
            second = cuda_ext.load()
        assert first == second and "could not be loaded" in first
        assert sum("could not be loaded" in str(w.message) for w in record) == 1
        monkeypatch.setattr(cuda_ext, "has_sources", lambda: False)
        cuda_ext.load.cache_clear()
        cuda_ext._load_prebuilt.cache_clear()
        with pytest.warns(RuntimeWarning, match="could not be loaded"):
            assert "could not be loaded" in cuda_ext.load()
    finally:
        cuda_ext.load.cache_clear()
        cuda_ext._load_prebuilt.cache_clear()


def test_the_library_of_torchs_cuda_major_serves(tmp_path, monkeypatch):
    """The one wheel holds a library per CUDA major: the one of torch's major is loaded, a source build's serves
    alone, and a wheel without torch's major says so (info lists the ones not loaded and why)."""
    for name in ("_C_cu12.abi3.so", "_C_cu13.abi3.so"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setattr(cuda_ext, "PACKAGE_DIR", str(tmp_path))
    chosen = {}
    for cuda in ("12.8", "13.0", "14.1", None):
        monkeypatch.setattr(torch.version, "cuda", cuda)
        library = cuda_ext.prebuilt_library()
        chosen[cuda] = os.path.basename(library) if library else None
    assert chosen == {"12.8": "_C_cu12.abi3.so", "13.0": "_C_cu13.abi3.so", "14.1": None, None: None}
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cuda_ext, "load", lambda: None)
    assert "_C_cu12.abi3.so not loaded (built for CUDA 12, torch has CUDA 13.0)" in cuda_ext.describe()
    (tmp_path / "_C_cu12.abi3.so").unlink()
    (tmp_path / "_C_cu13.abi3.so").unlink()
    (tmp_path / "_C.abi3.so").write_bytes(b"")  # a source build: for the local CUDA, whatever its major
    assert os.path.basename(cuda_ext.prebuilt_library()) == "_C.abi3.so"
