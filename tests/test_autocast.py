"""torch.autocast: the layers compute as nn.Linear does inside an autocast region.

Mixed-precision training keeps fp32 parameters and runs linear layers in bf16/fp16 under torch.autocast; the
activations reaching a layer may be fp32 or already 16-bit. torch gives custom ops no autocast rule, so the
public functions cast (x, W0, bias, A, B) to autocast's dtype themselves (fp64 excepted, as autocast does).
The result must equal, bit for bit, the same computation done outside autocast on explicitly cast copies: same
kernels, same inputs. Grads reach the fp32 parameters in fp32.
"""

import copy

import pytest
import torch
from torch import nn

from conftest import DEVICE, HAS_GPU, assert_parity, make_inputs, seed_tensor
from lora_kernels import FusedLoRALinear, backends, lora_linear, lora_linear_mixed, reference, stack_adapters

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
BACKENDS = ["torch", "triton"] + (["cuda"] if HAS_GPU and backends.CudaBackend.unavailable_reason(
    DEVICE, torch.bfloat16) is None else [])


def _layer(backend, p=0.0, **kw):
    layer = FusedLoRALinear(40, 24, r=4, lora_alpha=8, lora_dropout=p, backend=backend, device=DEVICE, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 would hide the low-rank path
    return layer


def _grads(layer):
    return [q.grad for q in (layer.lora_A, layer.lora_B)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("x_dtype", ["fp32", "autocast"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_layer_under_autocast_is_the_cast_layer(backend, dtype, x_dtype, p):
    layer = _layer(backend, p).train()
    cast = copy.deepcopy(layer).to(dtype)  # what autocast computes: every input in its dtype
    x = torch.randn(2, 37, 40, device=DEVICE)
    x = x if x_dtype == "fp32" else x.to(dtype)
    xa = x.detach().clone().requires_grad_()
    torch.manual_seed(5)  # the same dropout seed for both
    with torch.autocast(DEVICE.type, dtype=dtype):
        y = layer(xa)
        assert y.dtype == dtype and nn.Linear(40, 24, device=DEVICE)(xa).dtype == dtype
    y.float().square().sum().backward()
    xc = x.detach().to(dtype).requires_grad_()
    torch.manual_seed(5)
    yc = cast(xc)
    yc.float().square().sum().backward()
    torch.testing.assert_close(y, yc, rtol=0, atol=0)
    assert xa.grad.dtype == x.dtype
    torch.testing.assert_close(xa.grad, xc.grad.to(x.dtype), rtol=0, atol=0)
    for mine, theirs in zip(_grads(layer), _grads(cast)):
        assert mine.dtype == torch.float32  # the parameters' own dtype
        # the fp32 sums the kernels accumulate (rounded to the cast layer's 16-bit grads by the cast layer's path)
        torch.testing.assert_close(mine.to(dtype), theirs, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_inside_the_autocast_region(backend):
    """A backward called inside the region (some training loops do) gives the same grads."""
    layer = _layer(backend, 0.1).train()
    x = torch.randn(37, 40, device=DEVICE)
    runs = []
    for inside in (False, True):
        layer.zero_grad()
        torch.manual_seed(5)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            y = layer(x)
            if inside:
                y.float().square().sum().backward()
        if not inside:
            y.float().square().sum().backward()
        runs.append([g.clone() for g in _grads(layer)])
    for outside, inside in zip(*runs):
        torch.testing.assert_close(inside, outside, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_parity_under_autocast(backend):
    """lora_linear with fp32 tensors under bf16 autocast against the fp64 reference, the rule taken in bf16."""
    x, w, b, a, bb = make_inputs(37, 40, 24, 5, torch.float32)
    seed = seed_tensor(11)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = lora_linear(x, w, b, a, bb, 1.5, 0.2, backend=backend, seed=seed)
    cast = [t.bfloat16() for t in (x, w, b, a, bb)]
    ref16, _ = reference.lora_forward(*cast, 1.5, 0.2, 11)
    ref64, _ = reference.lora_forward(*(t.double() for t in cast), 1.5, 0.2, 11)
    assert_parity("y", y, ref16, ref64)


def test_fp64_is_left_alone():
    """autocast never casts fp64: an fp64 layer computes in fp64 inside a region, like nn.Linear."""
    layer = _layer("torch").double()
    x = torch.randn(5, 40, device=DEVICE, dtype=torch.float64)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)


def test_outside_autocast_nothing_is_cast():
    """Outside a region the dtype rule stays strict: mismatched inputs are refused, not silently cast."""
    layer = _layer("torch")
    with pytest.raises(TypeError, match="weight: dtype torch.float32 does not match x's dtype torch.bfloat16"):
        layer(torch.randn(3, 40, device=DEVICE, dtype=torch.bfloat16))
    with torch.autocast(DEVICE.type, enabled=False):
        assert layer(torch.randn(3, 40, device=DEVICE)).dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("train", [False, True])
def test_mixed_batch_under_autocast(backend, train):
    layer = _layer(backend, 0.2).train(train)
    layer.add_adapter("other", r=3, lora_alpha=6, lora_dropout=0.1)
    with torch.no_grad():
        layer.adapters["other"].lora_B.normal_()
    cast = copy.deepcopy(layer).to(torch.bfloat16)
    x = torch.randn(37, 40, device=DEVICE)
    ids = torch.randint(-1, 2, (37,), device=DEVICE)
    outs = []
    for model, xin in ((layer, x), (cast, x.bfloat16())):
        torch.manual_seed(5)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=model is layer):
            y = model(xin, adapter_ids=ids)
        if train:
            y.float().square().sum().backward()
        outs.append(y)
    assert outs[0].dtype == torch.bfloat16
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    if train:
        mine = [layer.lora_A.grad, layer.adapters["other"].lora_A.grad, layer.adapters["other"].lora_B.grad]
        theirs = [cast.lora_A.grad, cast.adapters["other"].lora_A.grad, cast.adapters["other"].lora_B.grad]
        for m, t in zip(mine, theirs):
            assert m.dtype == torch.float32
            torch.testing.assert_close(m.to(t.dtype), t, rtol=0, atol=0)


def test_mixed_inference_keeps_the_cast_stack():
    """In inference the adapters are cast once, when stacked, and the cast copy is reused by later calls."""
    layer = _layer("torch").eval()
    layer.add_adapter("other", r=3)
    x, ids = torch.randn(6, 40, device=DEVICE), torch.tensor([0, 1, -1, 1, 0, 0], device=DEVICE)
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        first = layer(x, adapter_ids=ids)
        stacked = layer._stack._cache[1][0]
        assert stacked.dtype == torch.bfloat16
        torch.testing.assert_close(layer(x, adapter_ids=ids), first, rtol=0, atol=0)
        assert layer._stack._cache[1][0] is stacked
    with torch.no_grad():  # outside the region: an fp32 stack again
        layer(x, adapter_ids=ids)
        assert layer._stack._cache[1][0].dtype == torch.float32


def test_functional_mixed_under_autocast():
    x, w, b, a0, b0 = make_inputs(9, 40, 24, 4, torch.float32)
    a1, b1 = torch.randn(2, 40, device=DEVICE), torch.randn(24, 2, device=DEVICE)
    A, B, owner = stack_adapters([a0, a1], [b0, b1])
    ids = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 0], device=DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = lora_linear_mixed(x, w, b, A, B, owner, ids, [2.0, 0.5], backend="torch")
    expected = lora_linear_mixed(*(t.bfloat16() for t in (x, w, b, A, B)), owner, ids, [2.0, 0.5], backend="torch")
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_compiled_under_autocast():
    """torch.compile(fullgraph=True) traces the casts: no graph break, the eager result."""
    layer = _layer("triton" if DEVICE.type == "cuda" or backends.triton_interpreting() else "torch")
    x = torch.randn(2, 5, 40, device=DEVICE)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y, expected = compiled(x), layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
