"""Checks that only mean something on a GPU: the planner measuring, real autotuning over every config, production
shapes, TF32.

Skipped with a visible reason on machines without CUDA (the parity tests of the other files then run the
kernels in Triton's interpreter instead).
"""

import pytest
import torch

from conftest import HAS_GPU, assert_parity, make_inputs, seed_tensor
from lora_kernels import lora_linear, plan, reference

pytestmark = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (none on this machine); "
                                "the same kernels are checked in the Triton interpreter by the other tests")


def _check(M, K, N, r, dtype, p, need_dx=True, backend="triton"):
    x, w, b, a, bb = make_inputs(M, K, N, r, dtype)
    x.requires_grad_(need_dx)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    y = lora_linear(x, w, b, a, bb, 2.0, p, backend=backend, seed=seed_tensor(9))
    gy = torch.randn_like(y)
    y.backward(gy)
    refs = []
    for dt in (dtype, torch.float64):
        args = [t.detach().to(dt) for t in (x, w, b, a, bb)]
        ry, xa = reference.lora_forward(*args, 2.0, p, 9)
        refs.append((ry, *reference.lora_backward(gy.to(dt), args[0], args[1], args[3], args[4], xa, 2.0, p, 9,
                                                  need_dx)))
    names = ("y", "grad x", "grad lora_A", "grad lora_B")
    for name, out, same, r64 in zip(names, (y, x.grad, a.grad, bb.grad), *refs):
        if same is not None:
            assert_parity(name, out, same, r64)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("r", [8, 16, 64])
def test_llm_layer_shape(r, p):
    _check(4096, 4096, 4096, r, torch.bfloat16, p)


@pytest.mark.parametrize("r", [128, 256])
def test_large_rank(r):
    _check(1024, 2048, 1536, r, torch.float16, 0.1)


@pytest.mark.parametrize("M", [1, 16, 17, 333])
def test_small_m(M):
    _check(M, 4096, 4096, 16, torch.bfloat16, 0.0)


def test_lora_only_backward_large():
    _check(2048, 4096, 4096, 16, torch.bfloat16, 0.1, need_dx=False)


def test_fp32_true_fp32_and_tf32():
    _check(512, 1024, 768, 16, torch.float32, 0.0)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        x, w, b, a, bb = make_inputs(512, 1024, 768, 16, torch.float32)
        y = lora_linear(x, w, b, a, bb, 1.0, backend="triton")
        y64 = reference.lora_forward(*(t.double() for t in (x, w, b, a, bb)), 1.0)[0]
        # TF32 keeps 10 mantissa bits: compare with a TF32-rounded bound, not the fp32 rule
        assert (y.double() - y64).abs().max() < 2**-10 * y64.abs().max() * 4
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def test_inductor_compile_on_gpu():
    """The compiled layer runs the plan the eager call measured and cached (nothing is timed in the graph)."""
    from lora_kernels import FusedLoRALinear

    layer = FusedLoRALinear(1024, 1024, r=16, init_lora_weights=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8, 128, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    y.float().square().mean().backward()
    torch.testing.assert_close(y, eager, rtol=2**-7, atol=2**-7)


@pytest.mark.parametrize("dropout", [False, True])
def test_planner_measures_on_the_gpu(dropout, tmp_path, monkeypatch):
    """A new key is timed on this GPU: the fastest forward and backward win, the ATen composition (PEFT's products)
    is always among the candidates, so auto is never slower than it in the same measurement; the call then meets
    the parity rule with the chosen plan."""
    monkeypatch.setenv("LORA_KERNELS_CACHE_DIR", str(tmp_path))
    plan.reset()
    try:
        call = plan.Call(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, 2048, 1024, 1024, 16,
                         dropout, 2, False)
        chosen, us = plan.tune(call)
        for kind, name in (("forward", chosen.forward), ("backward", chosen.backward)):
            times = {k.split(":")[1]: v for k, v in us.items() if k.startswith(kind) and isinstance(v, float)}
            assert "aten" in times and name == min(times, key=times.get)
            assert times[name] <= times["aten"]
        assert plan.choose(call) == chosen
        _check(2048, 1024, 1024, 16, torch.bfloat16, 0.1 if dropout else 0.0, backend="auto")
    finally:
        monkeypatch.undo()
        plan.reset()
