"""FusedLoRALinear: construction, sharing, freezing, merging, state dict, and parity as a layer."""

import math

import pytest
import torch
from torch import nn

from conftest import DEVICE, DTYPES, EPS, assert_parity
from lora_kernels import FusedLoRALinear, lora_linear, reference

BACKENDS = ["torch", "triton"]


def _linear(K=24, N=20, bias=True, dtype=torch.float32):
    return nn.Linear(K, N, bias=bias, device=DEVICE, dtype=dtype)


def test_from_linear_shares_storage_and_freezes():
    lin = _linear()
    layer = FusedLoRALinear.from_linear(lin, r=4, lora_alpha=8)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert (layer.in_features, layer.out_features, layer.r, layer.scaling) == (24, 20, 4, 2.0)
    assert layer.lora_A.shape == (4, 24) and layer.lora_B.shape == (20, 4)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["adapters.default.lora_A",
                                                                           "adapters.default.lora_B"]
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]  # loralib's keys


def test_starts_equal_to_the_base_layer():
    lin = _linear()
    layer = FusedLoRALinear.from_linear(lin, r=4)
    x = torch.randn(3, 7, 24, device=DEVICE)
    assert not layer.lora_B.any()  # B starts at zero: the low-rank term vanishes
    # equal to the base layer up to the rounding of its GEMM (Triton's tiles sum in another order than cuBLAS)
    base64 = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert_parity("y", layer(x), lin(x), base64)


def test_init_schemes():
    layer = FusedLoRALinear(64, 48, r=8, device=DEVICE)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 3
    assert torch.count_nonzero(layer.lora_B) == 0
    g = FusedLoRALinear(64, 48, r=8, init_lora_weights="gaussian", device=DEVICE)
    assert abs(g.lora_A.std().item() - 1 / 8) < 0.03 and torch.count_nonzero(g.lora_B) == 0
    f = FusedLoRALinear(64, 48, r=8, init_lora_weights=False, device=DEVICE)
    assert torch.count_nonzero(f.lora_B) > 0
    with pytest.raises(ValueError, match="init_lora_weights: expected"):
        FusedLoRALinear(64, 48, r=8, init_lora_weights="orthogonal")


def test_rslora_scaling():
    assert FusedLoRALinear(32, 32, r=16, lora_alpha=8).scaling == 0.5
    assert FusedLoRALinear(32, 32, r=16, lora_alpha=8, use_rslora=True).scaling == 2.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_parity_with_leading_dims(backend, dtype):
    layer = FusedLoRALinear(40, 36, r=5, lora_alpha=10, init_lora_weights=False, backend=backend,
                            device=DEVICE, dtype=dtype)
    x = torch.randn(2, 3, 40, device=DEVICE, dtype=dtype)
    y = layer(x)
    args = (layer.weight, layer.bias, layer.lora_A, layer.lora_B)  # adapters in fp32 next to a 16-bit W0
    same, _ = reference.lora_forward(x.reshape(6, 40), *[t.detach().to(dtype) for t in args], layer.scaling)
    ref64, _ = reference.lora_forward(x.reshape(6, 40).double(), *[t.detach().double() for t in args], layer.scaling)
    assert y.shape == (2, 3, 36)
    assert_parity("y", y.reshape(6, 36), same, ref64)


def test_dropout_only_in_training():
    layer = FusedLoRALinear(32, 32, r=4, lora_dropout=0.5, init_lora_weights=False, device=DEVICE)
    x = torch.randn(8, 32, device=DEVICE)
    layer.eval()
    y_eval = layer(x)
    assert torch.equal(y_eval, layer(x))
    torch.testing.assert_close(y_eval, reference.lora_forward(x, layer.weight, layer.bias, layer.lora_A.detach(),
                                                              layer.lora_B.detach(), layer.scaling)[0])
    layer.train()
    assert not torch.allclose(layer(x), y_eval)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_unmerge(dtype):
    layer = FusedLoRALinear(48, 40, r=6, lora_alpha=12, init_lora_weights=False, device=DEVICE, dtype=dtype)
    w0 = layer.weight.detach().clone()
    x = torch.randn(5, 48, device=DEVICE, dtype=dtype)
    layer.merge()
    assert layer.merged
    layer.merge()  # idempotent: merging twice must not add the update twice
    y_merged = layer(x)
    # merged forward = plain linear with W0 + s B A, computed in fp32 and rounded once
    w64 = w0.double() + layer.scaling * (layer.lora_B.detach().double() @ layer.lora_A.detach().double())
    y64 = x.double() @ w64.t() + layer.bias.double()
    y_same = torch.nn.functional.linear(x, w64.to(dtype), layer.bias)
    assert_parity("merged y", y_merged, y_same, y64)
    layer.unmerge()
    assert not layer.merged
    # unmerge gives W0 back within two roundings at the magnitude of W0 + s B A
    bound = 2 * EPS[dtype] * (w0.double().abs() + (w64 - w0.double()).abs() + w64.abs())
    assert ((layer.weight.double() - w0.double()).abs() <= bound).all()
    # and the forward is the LoRA path again (not the merged plain linear)
    expected = lora_linear(x, layer.weight, layer.bias, layer.lora_A.to(dtype), layer.lora_B.to(dtype), layer.scaling)
    assert torch.equal(layer(x), expected)


def test_merge_on_eval_and_to_linear():
    layer = FusedLoRALinear(32, 24, r=4, init_lora_weights=False, merge_on_eval=True, device=DEVICE)
    x = torch.randn(4, 32, device=DEVICE)
    y = layer(x)
    layer.eval()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.train()
    assert not layer.merged
    lin = layer.to_linear()
    assert type(lin) is nn.Linear and not layer.merged
    assert lin.weight.data_ptr() != layer.weight.data_ptr()
    torch.testing.assert_close(lin(x), y, rtol=1e-5, atol=1e-5)


def test_state_dict_keys_and_roundtrip():
    layer = FusedLoRALinear(16, 12, r=2, init_lora_weights=False, device=DEVICE)
    sd = layer.state_dict()
    assert list(sd) == ["weight", "bias", "lora_A", "lora_B"]
    other = FusedLoRALinear(16, 12, r=2, device=DEVICE)
    other.load_state_dict(sd)
    x = torch.randn(3, 16, device=DEVICE)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    nobias = FusedLoRALinear(16, 12, r=2, bias=False)
    assert list(nobias.state_dict()) == ["weight", "lora_A", "lora_B"] and nobias.bias is None


def test_training_step_updates_only_lora():
    lin = _linear()
    layer = FusedLoRALinear.from_linear(lin, r=4, lora_alpha=8)
    w0 = lin.weight.detach().clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    x, target = torch.randn(16, 24, device=DEVICE), torch.randn(16, 20, device=DEVICE)
    losses = []
    for _ in range(5):
        loss = (layer(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(lin.weight, w0)
    assert torch.count_nonzero(layer.lora_B) > 0


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(r=0), r"r: expected an integer >= 1, got 0"),
    (dict(r=2.5), r"r: expected an integer >= 1"),
    (dict(lora_alpha=0), r"lora_alpha: expected a finite number > 0, got 0"),
    (dict(lora_alpha=-1.0), r"lora_alpha: expected a finite number > 0"),
    (dict(lora_alpha=float("inf")), r"lora_alpha: expected a finite number > 0"),
    (dict(lora_dropout=1.0), r"lora_dropout: expected a probability in \[0, 1\), got 1.0"),
    (dict(backend="fastest"), r"backend: unknown name 'fastest'"),
])
def test_bad_hyperparameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        FusedLoRALinear(32, 24, **kwargs)


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="linear: expected an nn.Linear, got Conv1d"):
        FusedLoRALinear.from_linear(nn.Conv1d(3, 3, 1))


# ---------------------------------------------------------------------------------------------------------------
# The adapters' parameter dtype (lora_dtype)
# ---------------------------------------------------------------------------------------------------------------
def test_adapter_dtype_defaults_and_choices():
    """fp32 adapters next to a 16-bit W0 (PEFT's default), W0's dtype otherwise; lora_dtype chooses; added
    adapters follow the layer's; a bad value is refused naming the argument."""
    for w_dtype, expected in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                              (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        layer = FusedLoRALinear(16, 12, r=2, device=DEVICE, dtype=w_dtype)
        assert layer.weight.dtype == w_dtype and layer.lora_A.dtype == layer.lora_B.dtype == expected
        layer.add_adapter("more", r=3)
        assert layer.adapters["more"].lora_A.dtype == layer.adapters["more"].lora_B.dtype == expected
    kept = FusedLoRALinear.from_linear(_linear(dtype=torch.bfloat16), r=2, lora_dtype=torch.bfloat16)
    assert kept.lora_A.dtype == kept.lora_B.dtype == torch.bfloat16
    assert FusedLoRALinear.from_linear(_linear(dtype=torch.bfloat16), r=2).lora_A.dtype == torch.float32
    assert "lora_dtype=torch.float32" in repr(FusedLoRALinear(16, 12, r=2, dtype=torch.bfloat16))
    assert "lora_dtype" not in repr(FusedLoRALinear(16, 12, r=2))  # (the same dtype as W0)
    for bad in ("bf16", torch.int8, 16):
        with pytest.raises(TypeError, match="lora_dtype: expected None"):
            FusedLoRALinear(16, 12, r=2, lora_dtype=bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapters_compute_in_w0_dtype(backend, dtype):
    """The forward is the 16-bit computation with the adapters cast (bit for bit, same dropout seed); the grads
    reach the fp32 adapters in fp32: the 16-bit grads before their rounding (equal to them once rounded)."""
    layer = FusedLoRALinear(40, 36, r=5, lora_alpha=10, lora_dropout=0.2, init_lora_weights=False, backend=backend,
                            device=DEVICE, dtype=dtype).train()
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(2, 19, 40, device=DEVICE, dtype=dtype)
    torch.manual_seed(3)
    y = layer(x)
    y.float().square().sum().backward()
    a16, b16 = (t.detach().to(dtype).requires_grad_() for t in (layer.lora_A, layer.lora_B))
    torch.manual_seed(3)
    expected = lora_linear(x, layer.weight, layer.bias, a16, b16, layer.scaling, 0.2, backend=backend)
    expected.float().square().sum().backward()
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    for param, grad16 in ((layer.lora_A, a16.grad), (layer.lora_B, b16.grad)):
        assert param.grad.dtype == torch.float32
        torch.testing.assert_close(param.grad.to(dtype), grad16, rtol=0, atol=0)


@pytest.mark.parametrize("backward", ["triton_split", "triton_fused"])
def test_fp32_adapters_grads_from_the_fp32_accumulators(backward):
    """Kernels that accumulate dA (and dB) in fp32 hand those sums to fp32 adapters without rounding them to W0's
    dtype: the parity rule against fp64 (the rounded 16-bit grads are the same-dtype reference)."""
    dtype = torch.bfloat16
    layer = FusedLoRALinear(40, 36, r=5, lora_alpha=10, lora_dropout=0.2, init_lora_weights=False,
                            backend=f"triton_xa_first+{backward}", device=DEVICE, dtype=dtype).train()
    x = torch.randn(2, 19, 40, device=DEVICE, dtype=dtype, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    refs = []
    for dt in (dtype, torch.float64):
        args = [t.detach().to(dt) for t in (x.reshape(-1, 40), layer.weight, layer.bias, layer.lora_A, layer.lora_B)]
        _, xa = reference.lora_forward(*args, layer.scaling, 0.2, seed)
        refs.append(reference.lora_backward(gy.reshape(-1, 36).to(dt), args[0], args[1], args[3], args[4], xa,
                                            layer.scaling, 0.2, seed)[1:])
    for name, param, same, r64 in zip(("lora_A", "lora_B"), (layer.lora_A, layer.lora_B), refs[0], refs[1]):
        assert param.grad.dtype == torch.float32
        assert_parity(f"grad {name}", param.grad, same.float(), r64)


def test_fp32_adapters_are_not_cast_per_call():
    """The one-launch forward rounds fp32 adapters to W0's dtype as it loads them: no cast op per call (the reference
    backend casts inside; the GEMM with extra K steps casts B [N, r] first), and an in-place change to an adapter
    shows in the next call."""
    from conftest import CountOps

    layer = FusedLoRALinear(24, 20, r=4, init_lora_weights=False, backend="triton_fused+triton_split",
                            device=DEVICE, dtype=torch.bfloat16).eval()
    x = torch.randn(5, 24, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        first = layer(x)
        with CountOps() as ops:
            again = layer(x)
        assert "_to_copy" not in ops.counts, ops.counts
        assert torch.equal(again, first)
        layer.lora_B.mul_(2.0)  # an in-place update (an optimizer step, load_state_dict)
        changed = layer(x)
    expected = lora_linear(x, layer.weight, layer.bias, layer.lora_A.bfloat16(), layer.lora_B.bfloat16(),
                           layer.scaling, backend="triton_fused+triton_split")
    assert torch.equal(changed, expected) and not torch.equal(changed, first)


def test_small_updates_survive_in_fp32_adapters():
    """Why fp32 is the default: an optimizer step smaller than bf16's rounding step is kept by fp32 adapters and
    lost by bf16 ones."""
    steps = {}
    for lora_dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        layer = FusedLoRALinear(24, 20, r=4, init_lora_weights=False, backend="torch", device=DEVICE,
                                dtype=torch.bfloat16, lora_dtype=lora_dtype)
        before = layer.lora_A.detach().clone()
        opt = torch.optim.SGD(layer.parameters(), lr=1e-6)
        layer(torch.randn(8, 24, device=DEVICE, dtype=torch.bfloat16)).float().sum().backward()
        opt.step()
        steps[lora_dtype] = (layer.lora_A.detach() != before).float().mean().item()
    assert steps[None] > 0.9 and steps[torch.bfloat16] < 0.05, steps


def test_fp16_training_with_grad_scaler():
    """fp16 mixed precision (GradScaler) refuses fp16 grads; the default fp32 adapters train."""
    layer = FusedLoRALinear(24, 20, r=4, init_lora_weights=False, backend="torch", device=DEVICE,
                            dtype=torch.float16)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**8)
    loss = layer(torch.randn(8, 24, device=DEVICE, dtype=torch.float16)).float().square().mean()
    scaler.scale(loss).backward()
    before = layer.lora_B.detach().clone()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(layer.lora_B, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_are_not_views(backend):
    """Like nn.Linear's, the layer's outputs are not views of another tensor (FSDP2 warns about modules returning
    views: an in-place op on one would bypass its backward hooks), for any number of leading dims, single
    adapter or mixed batch, with and without grads; and they keep their values and grads."""
    layer = FusedLoRALinear(24, 20, r=4, init_lora_weights=False, backend=backend, device=DEVICE)
    layer.add_adapter("other", r=2, init_lora_weights=False)
    for shape in [(24,), (5, 24), (2, 3, 24)]:
        x = torch.randn(*shape, device=DEVICE, requires_grad=True)
        ids = torch.zeros(shape[:-1] or (), dtype=torch.long, device=DEVICE)
        for kwargs in ({}, {"adapter_ids": ids}):
            y = layer(x, **kwargs)
            assert y.shape == (*shape[:-1], 20) and not y._is_view(), (shape, kwargs)
            y.square().sum().backward()
            with torch.no_grad():
                assert not layer(x, **kwargs)._is_view()
            expected = lora_linear(x.detach().reshape(-1, 24), layer.weight, layer.bias, layer.lora_A.detach(),
                                   layer.lora_B.detach(), layer.scaling, backend=backend)
            torch.testing.assert_close(y.detach().reshape(-1, 20), expected)
