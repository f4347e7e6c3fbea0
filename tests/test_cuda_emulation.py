"""The CUDA C++ kernels' own code (csrc/: launchers, tiling, shared memory, synchronization, Philox, atomics, the
decode kernel's cooperative wait), run on the CPU through a host-thread model of CUDA (tests/emulation/), behind the
real CudaBackend glue, against the fp64 reference with the parity rule.

What this cannot show (left to tests/test_cuda_ext.py on a GPU): the speed, the tensor cores' own rounding and
summation order (emulated MMAs sum in fp32, in order), the hardware memory model, real shared-memory limits.
Small shapes: every emulated CUDA thread is an OS thread.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess

import pytest
import torch

from conftest import assert_compiled_matches_eager, assert_parity, make_inputs
from lora_kernels import backends, cuda_build, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _build(tmp_dir):
    cxx = shutil.which("g++") or shutil.which("c++")
    home = cuda_build.find_cuda_home()
    if cxx is None or home is None or not os.path.isfile(os.path.join(home, "include", "cuda_fp16.h")):
        pytest.skip("needs a host C++20 compiler and the CUDA headers (cuda_fp16.h) to build the emulation")
    sources = [os.path.join(ROOT, "tests", "emulation", f) for f in ("harness.cpp", "lk_emulation.h")]
    sources += [os.path.join(ROOT, "csrc", f) for f in sorted(os.listdir(os.path.join(ROOT, "csrc")))
                if f.endswith((".cuh", ".h", ".cu"))]
    digest = hashlib.sha1(b"".join(open(s, "rb").read() for s in sources)).hexdigest()[:12]
    lib = os.path.join(tmp_dir, f"lk_emulation_{digest}.so")
    if not os.path.exists(lib):
        subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-DLK_EMULATE",
                        f"-I{ROOT}/csrc", f"-I{ROOT}/tests/emulation", f"-I{home}/include", sources[0], "-o", lib],
                       check=True)
    return lib


def _load(path):
    lib = ctypes.CDLL(path)
    P, L, I, F = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_float
    lib.lk_emu_forward.restype = ctypes.c_char_p
    lib.lk_emu_forward.argtypes = [I, I, P, P, P, P, P, P, P, L, L, L, I, F, I, P, ctypes.c_uint, F, I]
    lib.lk_emu_backward.restype = ctypes.c_char_p
    lib.lk_emu_backward.argtypes = [I, P, P, P, P, P, P, P, P, P, L, L, L, I, F, I, P, ctypes.c_uint, F]
    lib.lk_emu_set_shared_memory_limit.argtypes = [ctypes.c_ulonglong]
    lib.lk_emu_set_decode_blocks_per_sm.argtypes = [I, I, I]
    return EmulatedOps(lib, path)


@pytest.fixture(scope="module")
def emulated_ops(tmp_path_factory):
    return _load(_build(str(tmp_path_factory.mktemp("emulation"))))


def _ptr(t):
    return None if t is None or t.numel() == 0 else t.data_ptr()


class EmulatedOps:
    """torch.ops.lora_kernels_cuda's interface, with the binding's conversions, over the emulated launchers."""

    sm_count = 2

    def __init__(self, lib, path):
        self.lib, self.path = lib, path

    @staticmethod
    def _dropout(seed, p):
        return (_ptr(seed), int(p * 2**31), 1.0 / (1.0 - p)) if p > 0 else (None, 0, 1.0)

    def forward(self, x, w, bias, a, b, seed, y, xa, scaling, p, store_xa, decode):
        (M, K), N, r = x.shape, w.shape[0], a.shape[0]
        err = self.lib.lk_emu_forward(DTYPE_CODE[x.dtype], int(decode), _ptr(x), _ptr(w), _ptr(bias), _ptr(a),
                                      _ptr(b), _ptr(y), _ptr(xa), M, N, K, r, scaling, int(store_xa),
                                      *self._dropout(seed, p), self.sm_count)
        assert err is None, err

    def backward(self, gy, x, w, a, b, xa, seed, dx, da, db, scaling, p, deterministic):
        (M, K), N, r = x.shape, w.shape[0], a.shape[0]
        err = self.lib.lk_emu_backward(DTYPE_CODE[x.dtype], _ptr(gy), _ptr(x), _ptr(w), _ptr(a), _ptr(b), _ptr(xa),
                                       _ptr(dx), _ptr(da), _ptr(db), M, N, K, r, scaling, int(deterministic),
                                       *self._dropout(seed, p))
        assert err is None, err


@pytest.fixture
def cuda_backend(emulated_ops, monkeypatch):
    monkeypatch.setattr(torch.ops, "lora_kernels_cuda", emulated_ops, raising=False)
    return backends.CudaBackend


def _check(cb, M, K, N, r, dtype, p, need_dx=True, deterministic=False, bias=True, scaling=1.5):
    x, w, b, a, bb = make_inputs(M, K, N, r, dtype, device="cpu", bias=bias)
    seed = torch.tensor([2**40 + 7], dtype=torch.int64) if p else None
    y, xa = cb.forward(x, w, b, a, bb, seed, scaling, p, True, decode=1 <= M <= 16)
    gy = torch.randn(M, N, dtype=dtype)
    dx, da, db = cb.backward(gy, x, w, a, bb, xa, seed, scaling, p, need_dx, deterministic)
    refs = []
    for dt in (dtype, torch.float64):
        args = [None if t is None else t.to(dt) for t in (x, w, b, a, bb)]
        ry, rxa = reference.lora_forward(*args, scaling, p, 2**40 + 7)
        refs.append((ry, rxa, *reference.lora_backward(gy.to(dt), args[0], args[1], args[3], args[4], rxa, scaling,
                                                       p, 2**40 + 7, need_dx)))
    same, r64 = refs
    assert_parity("y", y, same[0], r64[0])
    # xa is fp32 for every input dtype: held to the fp32 rule against the same-dtype reference's rounding
    assert_parity("xa", xa, same[1].float(), r64[1])
    if need_dx:
        assert_parity("grad x", dx, same[2], r64[2])
    else:
        assert dx.numel() == 0
    assert_parity("grad lora_A", da, same[3], r64[3])
    assert_parity("grad lora_B", db, same[4], r64[4])
    return y, xa, dx, da, db


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 16, 17, 70])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_parity(cuda_backend, dtype, M, p):
    """M <= 16 runs the decode kernel (cooperative, two emulated SMs), larger M the tiled one."""
    _check(cuda_backend, M, 72, 40, 3, dtype, p)


@pytest.mark.parametrize("r", [1, 16, 17, 40, 256])
def test_ranks(cuda_backend, r):
    _check(cuda_backend, 20, 96, 48, r, torch.bfloat16, 0.1)
    _check(cuda_backend, 3, 96, 48, r, torch.float16, 0.0)


def test_odd_shapes_scalar_loads(cuda_backend):
    """K, N, r odd: no 16-byte loads anywhere; several row and column tiles; no bias."""
    _check(cuda_backend, 131, 101, 77, 3, torch.float16, 0.2, bias=False)
    _check(cuda_backend, 9, 101, 77, 3, torch.bfloat16, 0.2, bias=False)


def test_many_tiles_and_chunks(cuda_backend):
    """Two row tiles x three column tiles (forward), three K tiles (backward); decode over 3 K chunks, 2 SMs."""
    _check(cuda_backend, 100, 160, 150, 8, torch.bfloat16, 0.1)
    _check(cuda_backend, 16, 600, 70, 8, torch.bfloat16, 0.1)


@pytest.mark.parametrize("sms", [1, 5])
def test_decode_grid_sizes(cuda_backend, monkeypatch, sms):
    """One block doing every item (its warps wait on chunks it computes itself), or more warps than items."""
    monkeypatch.setattr(EmulatedOps, "sm_count", sms)
    _check(cuda_backend, 7, 520, 33, 5, torch.bfloat16, 0.1)


@pytest.mark.parametrize("M, dtype", [(1, torch.bfloat16), (2, torch.float16), (3, torch.float32), (6, torch.bfloat16),
                                      (13, torch.float16), (16, torch.bfloat16), (16, torch.float32)])
def test_decode_unrolled_loop_tails_and_clamped_rows(cuda_backend, M, dtype):
    """Every decode variant (CUDA cores up to 8 rows and for fp32, tensor cores for 16-bit 9..16) with K long enough
    for its unrolled 16-byte loop (four chunks of 32 lanes x 16 bytes at M = 1) and a tail after it; N and r not
    multiples of the rows per item (the last item's rows clamped); r > 32 (B's ranks in two passes of the lanes);
    dropout applied inside the unrolled loop."""
    K = 1032 if dtype != torch.float32 else 1028
    _check(cuda_backend, M, K, 37, 37, dtype, 0.1)


def test_decode_forward_is_bitwise_repeatable(cuda_backend, monkeypatch):
    """Each element of xa and y is summed by one warp in a fixed order (no atomics on values): two runs on 5 emulated
    SMs, whose threads interleave differently each time, agree bit for bit."""
    monkeypatch.setattr(EmulatedOps, "sm_count", 5)
    x, w, b, a, bb = make_inputs(6, 1032, 37, 37, torch.bfloat16, device="cpu")
    seed = torch.tensor([11], dtype=torch.int64)
    first, second = (cuda_backend.forward(x, w, b, a, bb, seed, 1.5, 0.1, True, decode=True) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_decode_occupancy_is_asked_per_kernel(emulated_ops, monkeypatch, tmp_path):
    """The launcher asks the runtime once per device how many blocks of a decode kernel fit on an SM, and keeps the
    answer; the kernels differ (registers), so each needs its own. Here M = 2's kernel fits 3 blocks per SM and
    M = 8's one: after M = 2 (a grid of 6 blocks on the 2 emulated SMs), M = 8 must get at most 2, or the emulated
    runtime refuses the cooperative launch as a GPU's does. A fresh copy of the library: its caches start empty."""
    copy = str(tmp_path / os.path.basename(emulated_ops.path))
    shutil.copy(emulated_ops.path, copy)
    fresh = _load(copy)
    monkeypatch.setattr(torch.ops, "lora_kernels_cuda", fresh, raising=False)
    code = DTYPE_CODE[torch.bfloat16]
    fresh.lib.lk_emu_set_decode_blocks_per_sm(code, 2, 3)
    fresh.lib.lk_emu_set_decode_blocks_per_sm(code, 8, 1)
    for M in (2, 8):  # 200 rows of W0 in items of 4 rows: 7 blocks of 8 warps wanted
        _check(backends.CudaBackend, M, 32, 200, 4, torch.bfloat16, 0.0)


def test_lora_only_backward_and_deterministic(cuda_backend):
    _check(cuda_backend, 70, 72, 40, 3, torch.bfloat16, 0.2, need_dx=False)
    torch.manual_seed(1)
    first = _check(cuda_backend, 150, 72, 40, 3, torch.bfloat16, 0.2, deterministic=True)
    torch.manual_seed(1)
    second = _check(cuda_backend, 150, 72, 40, 3, torch.bfloat16, 0.2, deterministic=True)
    for u, v in zip(first[2:], second[2:]):
        assert torch.equal(u, v)


def test_empty_batch(cuda_backend):
    x, w, b, a, bb = make_inputs(0, 32, 16, 2, torch.bfloat16, device="cpu")
    y, xa = cuda_backend.forward(x, w, b, a, bb, None, 1.0, 0.0, True, decode=False)
    assert y.shape == (0, 16) and xa.shape == (0, 2)
    dx, da, db = cuda_backend.backward(torch.zeros(0, 16, dtype=torch.bfloat16), x, w, a, bb, xa, None, 1.0, 0.0,
                                       True, False)
    assert dx.shape == (0, 32) and torch.equal(da, torch.zeros_like(a)) and torch.equal(db, torch.zeros_like(bb))


def test_dropout_mask_is_the_reference_mask(cuda_backend):
    """x = 1, A = B = I, W0 = 0: y is the kept mask times 1/(1-p), in both forward kernels."""
    K = 32
    eye = torch.eye(K, dtype=torch.float16)
    for M in (3, 16, 37):
        x = torch.ones(M, K, dtype=torch.float16)
        y, _ = cuda_backend.forward(x, torch.zeros_like(eye), None, eye, eye, torch.tensor([99], dtype=torch.int64),
                                    1.0, 0.25, False, decode=M <= 16)
        keep = reference.dropout_keep_mask(99, M, K, 0.25)
        assert torch.equal(y != 0, keep), M


@pytest.fixture
def cuda_backend_on_cpu(cuda_backend, monkeypatch):
    """backend="cuda" accepted for CPU tensors, so the public API reaches the emulated kernels."""
    monkeypatch.setattr(backends.CudaBackend, "unavailable_reason", staticmethod(lambda device, dtype: None))
    return cuda_backend


@pytest.mark.parametrize("M", [4, 40])
def test_public_api_and_compile(cuda_backend_on_cpu, M):
    """lora_linear and FusedLoRALinear with backend="cuda": autograd, 3-D inputs, torch.compile(fullgraph=True),
    against the torch backend on the same parameters and seed."""
    from lora_kernels import FusedLoRALinear, lora_linear

    x, w, b, a, bb = make_inputs(M, 48, 32, 4, torch.bfloat16, device="cpu")
    seed = torch.tensor([5], dtype=torch.int64)
    gy = torch.randn(2, M // 2, 32, dtype=torch.float64)
    outs = {}
    for backend, dt in (("cuda", torch.bfloat16), ("torch", torch.bfloat16), ("torch", torch.float64)):
        xi, ai, bi = (t.to(dt).clone().requires_grad_(True) for t in (x, a, bb))
        y = lora_linear(xi.view(2, M // 2, 48), w.to(dt), b.to(dt), ai, bi, 2.0, 0.1, backend=backend, seed=seed)
        y.backward(gy.to(dt))
        outs[backend, dt] = (y, xi.grad, ai.grad, bi.grad)
    for name, out, same, ref in zip(("y", "grad x", "grad lora_A", "grad lora_B"), outs["cuda", torch.bfloat16],
                                    outs["torch", torch.bfloat16], outs["torch", torch.float64]):
        assert_parity(name, out, same, ref)

    layer = FusedLoRALinear(48, 32, r=4, lora_alpha=8, lora_dropout=0.1, backend="cuda", init_lora_weights=False,
                            dtype=torch.bfloat16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_compiled_matches_eager(layer, compiled, [x], [layer.lora_A, layer.lora_B], rtol=0, atol=0)


def test_rank_over_the_shared_memory_limit_says_so(cuda_backend, emulated_ops):
    """r = 256 needs ~150 KiB (forward) and ~198 KiB (backward) per block: on a GPU with an A100's 163 KiB the
    forward runs and the backward refuses with the reason instead of launching."""
    emulated_ops.lib.lk_emu_set_shared_memory_limit(163 * 1024)
    try:
        x, w, b, a, bb = make_inputs(20, 64, 40, 256, torch.bfloat16, device="cpu")
        y, xa = cuda_backend.forward(x, w, b, a, bb, None, 1.0, 0.0, True, decode=False)
        assert torch.isfinite(y).all()
        with pytest.raises(AssertionError, match="more shared memory per block than this GPU has"):
            cuda_backend.backward(torch.randn_like(y), x, w, a, bb, xa, None, 1.0, 0.0, True, False)
    finally:
        emulated_ops.lib.lk_emu_set_shared_memory_limit(0)
