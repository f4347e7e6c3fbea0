"""QLoRA over bitsandbytes base layers (its CPU kernels quantize here): the formats read exactly as bitsandbytes
dequantizes them; forward and grads of x, A, B against the fp64 reference from the dequantized weight in every plan,
NF4 / FP4 with and without double quantization, int8, bf16 / fp16 / fp32 compute, odd shapes; parity with PEFT's
LoRA on the same Linear4bit layers; nothing of size N x K saved for backward; inject on a small 4-bit Llama trains
the adapters only; PEFT's adapter files both ways; merging refused or requantized; clear refusals before any kernel;
the ops under opcheck and torch.compile; without bitsandbytes nothing fails."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import DEVICE, assert_parity, llama_4bit, lm_losses, seed_tensor
from lora_kernels import BackendUnavailableError, FusedLoRALinear, inject, plan, quantized, reference
from lora_kernels.layers import QuantizedLoRALinear
from lora_kernels.contract import draw_seed
from lora_kernels.quantized import QuantizedWeight, qlora_linear

bnb = pytest.importorskip("bitsandbytes")

FORMATS = [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)]
# every forward and backward variant of the Triton family (each forward once, each backward once), and the others
PLANS_16 = ["torch", "aten", "triton_quantized+triton_split", "triton_fused+triton_fused",
            "triton_xa_first+aten", "triton_cublas+triton_split"]
PLANS_32 = ["torch", "aten", "triton"]


def _linear4bit(K, N, fmt="nf4", dq=False, bias=True, compute_dtype=None, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(K, N, bias=bias, dtype=dtype)
    layer = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=compute_dtype, quant_type=fmt, compress_statistics=dq)
    layer.load_state_dict(dense.state_dict())
    return layer.to(DEVICE)


def _linear8bit(K, N, bias=True, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(K, N, bias=bias)
    layer = bnb.nn.Linear8bitLt(K, N, bias=bias, has_fp16_weights=False)
    layer.load_state_dict(dense.state_dict())
    return layer.to(DEVICE)


def _ours(base, r, backend, dtype, seed=1):
    """Our layer over `base`, with random B (a zero B hides the low-rank path) and adapters in the compute dtype."""
    torch.manual_seed(seed)
    layer = FusedLoRALinear.from_linear(base, r=r, lora_alpha=2 * r, init_lora_weights=False, backend=backend,
                                        lora_dtype=dtype)
    assert isinstance(layer, QuantizedLoRALinear)
    return layer


def _reference(layer, x, grad_y, dtype):
    """(y, dx, dA, dB) of the reference formulas on the dequantized weight in `dtype`."""
    w = reference.dequantize(layer.quantized_weight(), dtype)
    b = layer.bias.to(dtype) if layer.bias is not None else None
    a, bb = layer.lora_A.detach().to(dtype), layer.lora_B.detach().to(dtype)
    xd = x.detach().to(dtype)
    y, xa = reference.lora_forward(xd, w, b, a, bb, layer.scaling, 0.0, None)
    dx, da, db = reference.lora_backward(grad_y.to(dtype), xd, w, a, bb, xa, layer.scaling, 0.0, None, True)
    return y, dx, da, db


def _check_layer(layer, M, dtype, name):
    K = layer.in_features
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    same = _reference(layer, x, grad_y, dtype)
    ref64 = _reference(layer, x, grad_y, torch.float64)
    for what, out, s, r in zip(("y", "dx", "dA", "dB"), (y, x.grad, layer.lora_A.grad, layer.lora_B.grad), same,
                               ref64):
        assert_parity(f"{name} {what}", out, s, r)


# --------------------------------------------------------------------------------------------------------------
# The formats
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,dq", FORMATS)
@pytest.mark.parametrize("K,N", [(128, 64), (37, 37), (72, 40)])
def test_dequantize_reads_the_format_as_bitsandbytes(fmt, dq, K, N):
    """The reference and the Triton pass give bitsandbytes' own dequantized matrix, bit for bit (K = 37 and 72: the
    packed codes and absmax blocks straddle rows)."""
    layer = _linear4bit(K, N, fmt, dq)
    qw = quantized.quantized_weight(layer)
    assert qw.fmt == fmt and qw.nested == dq and qw.shape == (N, K)
    theirs = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    ours = reference.dequantize(qw, torch.float32)
    assert torch.equal(ours, theirs)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(quantized.dequantize(qw, dtype), ours.to(dtype))
        assert torch.equal(reference.dequantize(qw, dtype, rows=slice(3, 9)), ours[3:9].to(dtype))


def test_int8_weight_reads_as_bitsandbytes_computes_it():
    layer = _linear8bit(96, 40)
    qw = quantized.quantized_weight(layer)
    assert qw.fmt == "int8" and qw.data.dtype == torch.int8
    w = reference.dequantize(qw, torch.float32)
    torch.testing.assert_close(w, layer.weight.data.float() * layer.weight.SCB[:, None].float() / 127, rtol=2e-7,
                               atol=0)
    assert torch.equal(quantized.dequantize(qw, torch.float32), w)
    x = torch.randn(5, 96, device=DEVICE)
    with torch.no_grad():  # bitsandbytes' own layer on this (CPU) path multiplies by the same matrix
        torch.testing.assert_close(layer(x), x @ w.t() + layer.bias, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Parity in every plan
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,dq", FORMATS)
@pytest.mark.parametrize("backend", PLANS_16)
def test_layer_parity_bf16(fmt, dq, backend):
    layer = _ours(_linear4bit(72, 40, fmt, dq, compute_dtype=torch.bfloat16), 5, backend, torch.bfloat16)
    _check_layer(layer, 37, torch.bfloat16, f"{fmt} dq={dq} {backend}")


@pytest.mark.parametrize("backend", PLANS_16)
@pytest.mark.parametrize("M,K,N,r", [(1, 37, 37, 1), (37, 128, 64, 16)])
def test_layer_parity_fp16_odd_shapes(backend, M, K, N, r):
    layer = _ours(_linear4bit(K, N, "nf4", True, compute_dtype=torch.float16), r, backend, torch.float16)
    _check_layer(layer, M, torch.float16, f"M={M} K={K} N={N} r={r} {backend}")


@pytest.mark.parametrize("backend", PLANS_32)
@pytest.mark.parametrize("fmt,dq", [("nf4", True), ("fp4", False)])
def test_layer_parity_fp32(backend, fmt, dq):
    layer = _ours(_linear4bit(72, 40, fmt, dq), 3, backend, torch.float32)
    _check_layer(layer, 9, torch.float32, f"{fmt} {backend}")


@pytest.mark.parametrize("backend", ["torch", "aten", "triton_quantized+triton_fused", "triton_fused+triton_split"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_layer_parity(backend, dtype):
    if dtype == torch.float32 and backend.startswith("triton"):
        backend = "triton"
    layer = _ours(_linear8bit(96, 40), 4, backend, dtype)
    _check_layer(layer, 11, dtype, f"int8 {backend}")


@pytest.mark.parametrize("backend", ["torch", "aten", "triton_quantized+triton_split", "triton_xa_first+triton_fused"])
def test_dropout_parity(backend):
    """With dropout the seed fixes the mask; forward and grads as the reference's with that seed."""
    base = _linear4bit(72, 40, "nf4", True, compute_dtype=torch.bfloat16)
    qw = quantized.quantized_weight(base)
    torch.manual_seed(5)
    x = torch.randn(2, 9, 72, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(6, 72, device=DEVICE) / 8).requires_grad_()
    b = (torch.randn(40, 6, device=DEVICE) / 2).requires_grad_()
    y = qlora_linear(x, qw, base.bias, a, b, 1.5, 0.25, backend=backend, seed=seed_tensor(77))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 9, 40)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    outs = {}
    for dtype in (torch.bfloat16, torch.float64):
        w = reference.dequantize(qw, dtype)
        x2 = x.detach().reshape(-1, 72).to(dtype)
        # the adapters as the kernels read them: fp32 masters rounded to the compute dtype
        a2, b2 = a.detach().bfloat16().to(dtype), b.detach().bfloat16().to(dtype)
        yr, xa = reference.lora_forward(x2, w, base.bias.to(dtype), a2, b2, 1.5, 0.25, 77)
        outs[dtype] = (yr, *reference.lora_backward(grad_y.reshape(-1, 40).to(dtype), x2, w, a2, b2, xa, 1.5, 0.25,
                                                    77, True))
    got = (y.reshape(-1, 40), x.grad.reshape(-1, 72), a.grad, b.grad)
    for i, what in enumerate(("y", "dx", "dA", "dB")):
        same = outs[torch.bfloat16][i].to(got[i].dtype)
        assert_parity(f"{backend} {what}", got[i], same, outs[torch.float64][i])


@pytest.mark.parametrize("fmt,dq", [("nf4", True), ("fp4", False)])
def test_matches_peft_lora_on_the_same_layer(fmt, dq):
    """PEFT's LoRA over the same Linear4bit (training mode: bitsandbytes' exact CPU path) and ours, adapters in bf16,
    both against the fp64 reference on the dequantized weight: ours within 2x PEFT's error (plus the floor)."""
    peft = pytest.importorskip("peft")
    base = _linear4bit(128, 64, fmt, dq, compute_dtype=torch.bfloat16)
    model = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"],
                                                                      init_lora_weights=False))
    pl = model.base_model.model[0]
    pl.to(torch.bfloat16)  # adapters in the compute dtype (PEFT then computes its LoRA term in bf16 as ours does)
    torch.manual_seed(2)
    ours = FusedLoRALinear.from_linear(base, r=8, lora_alpha=16, backend="triton", lora_dtype=torch.bfloat16)
    with torch.no_grad():
        ours.lora_A.copy_(pl.lora_A["default"].weight)
        ours.lora_B.copy_(pl.lora_B["default"].weight)
    x = torch.randn(21, 128, device=DEVICE, dtype=torch.bfloat16)
    grad_y = torch.randn(21, 64, device=DEVICE, dtype=torch.bfloat16)
    got = {}
    for name, layer, a, b in (("peft", model, pl.lora_A["default"].weight, pl.lora_B["default"].weight),
                              ("ours", ours, ours.lora_A, ours.lora_B)):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(grad_y)
        got[name] = (y, xi.grad, a.grad, b.grad)
    ref = _reference(ours, x, grad_y, torch.float64)
    for i, what in enumerate(("y", "dx", "dA", "dB")):
        assert_parity(f"{fmt} {what}", got["ours"][i], got["peft"][i].to(got["ours"][i].dtype), ref[i])


# --------------------------------------------------------------------------------------------------------------
# Memory: nothing of size N x K between forward and backward
# --------------------------------------------------------------------------------------------------------------
def _forward_saving_nothing_of_w0(layer, x, N, K):
    """(y, the tensors saved for the backward) of layer(x); none of them floating-point and of W0's size."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    big = [tuple(t.shape) for t in saved if t.is_floating_point() and t.numel() >= N * K // 4]
    assert not big, f"floating-point tensors of W0's size saved for backward: {big}"
    return y, saved


@pytest.mark.parametrize("backend", ["aten", "triton_quantized+triton_split", "triton_cublas+aten"])
def test_nothing_of_size_n_by_k_saved_for_backward(backend):
    K, N, M, r = 128, 192, 24, 8
    layer = _ours(_linear4bit(K, N, "nf4", True, compute_dtype=torch.bfloat16), r, backend, torch.float32)
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y, saved = _forward_saving_nothing_of_w0(layer, x, N, K)
    # x and the [M, r] product (fp32): nothing else of the step's own
    own = {t.untyped_storage().data_ptr() for t in layer.state_dict(keep_vars=True).values()}
    fresh = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved
             if t.untyped_storage().data_ptr() not in own}
    assert sum(fresh.values()) == M * K * 2 + M * r * 4
    y.sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def test_inject_on_4bit_llama_trains_only_the_adapters():
    from lora_kernels import mark_only_lora_as_trainable

    model = inject(llama_4bit(), TARGETS, r=4, lora_alpha=8, lora_dropout=0.1, backend="triton")
    layers = [m for m in model.modules() if isinstance(m, QuantizedLoRALinear)]
    assert len(layers) == 2 * len(TARGETS)
    mark_only_lora_as_trainable(model)
    frozen = {n: t.detach().clone() for n, t in model.state_dict().items() if "lora_" not in n}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    losses = lm_losses(model, torch.randint(0, 64, (2, 12), device=DEVICE), 3)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    for n, t in model.state_dict().items():
        if n in frozen:
            assert torch.equal(t, frozen[n]), f"{n} changed"
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items() if n.endswith("lora_B"))
    assert losses[-1] < losses[0]


def test_peft_adapter_on_the_4bit_model_loads_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    from lora_kernels import load_adapter, save_adapter

    base = llama_4bit()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                  init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    ours = inject(copy.deepcopy(base), TARGETS, r=4, lora_alpha=8)
    load_adapter(ours, tmp_path / "peft")
    ids = torch.randint(0, 64, (2, 7), device=DEVICE)
    with torch.no_grad():
        expected = pm(ids).logits
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)
    save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    back.train()  # from_pretrained sets eval mode, where bitsandbytes' CPU kernels take another path (rounding apart)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_fuse_takes_peft_layers_over_quantized_bases():
    peft = pytest.importorskip("peft")
    from lora_kernels.peft import fuse

    pm = peft.get_peft_model(llama_4bit(compute_dtype=torch.bfloat16), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    ids = torch.randint(0, 64, (2, 7), device=DEVICE)
    with torch.no_grad():
        expected = pm(ids).logits
    fuse(pm, backend="triton")
    fused = [m for m in pm.modules() if type(m).__name__.startswith("FusedPeftLinear")]
    assert len(fused) == 2 * len(TARGETS)
    with torch.no_grad():
        got = pm(ids).logits
    # PEFT adds an fp32 LoRA term to bitsandbytes' bf16 output; ours computes the layer in bf16: compare as bf16 layers
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


# --------------------------------------------------------------------------------------------------------------
# Merging, refusals, state dict
# --------------------------------------------------------------------------------------------------------------
def test_merge_refused_to_linear_and_requantized_base():
    layer = _ours(_linear4bit(128, 64, "nf4", True), 4, "torch", torch.float32)
    with pytest.raises(RuntimeError, match="quantized"):
        layer.merge()
    x = torch.randn(5, 128, device=DEVICE)
    with torch.no_grad():
        y = layer(x)
        dense = layer.to_linear()
        assert type(dense) is nn.Linear
        torch.testing.assert_close(dense(x), y, rtol=1e-5, atol=1e-5)
        assert layer.to_base_layer(merge=False) is layer.base_layer
        with pytest.warns(UserWarning, match="quantizes again"):
            merged = layer.to_base_layer(merge=True)
        assert isinstance(merged, bnb.nn.Linear4bit)
        merged.train()  # bitsandbytes' exact CPU path
        again = reference.dequantize(quantized.quantized_weight(merged), torch.float32)
        # within the 4-bit grid's rounding of the merged weight (a block's absmax / 8 at most, NF4's widest step)
        assert (again - layer.merged_weight()).abs().max() < layer.merged_weight().abs().max() / 4
        assert merged.weight.quant_state.quant_type == "nf4" and merged.weight.quant_state.nested


def test_state_dict_holds_the_base_layers_entries_and_the_adapters():
    """The base layer's own entries (bitsandbytes' quantization state) under base_layer., the adapters under loralib's
    keys; the adapters load into another layer over the same base (bitsandbytes' layers do not load their own
    quantized entries back through load_state_dict: transformers' loader does that)."""
    base = _linear4bit(72, 40, "fp4", True)
    layer = _ours(base, 4, "torch", torch.float32)
    sd = layer.state_dict()
    assert {f"base_layer.{k}" for k in base.state_dict()} | {"lora_A", "lora_B"} == set(sd)
    fresh = _ours(base, 4, "torch", torch.float32, seed=9)
    fresh.load_state_dict({k: v for k, v in sd.items() if k.startswith("lora_")}, strict=False)
    x = torch.randn(3, 72, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))


def test_refusals_name_the_argument():
    base = _linear4bit(72, 40)
    with pytest.raises(ValueError, match="merge_on_eval"):
        FusedLoRALinear.from_linear(base, r=4, merge_on_eval=True)
    layer = FusedLoRALinear.from_linear(base, r=4)
    with pytest.raises(ValueError, match="adapter_ids"):
        layer(torch.randn(2, 72, device=DEVICE), adapter_ids=torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="x: last dimension"):
        layer(torch.randn(2, 71, device=DEVICE))
    qw = quantized.quantized_weight(base)
    a, b = torch.randn(4, 72, device=DEVICE), torch.randn(40, 4, device=DEVICE)
    x = torch.randn(3, 72, device=DEVICE)
    with pytest.raises(ValueError, match="absmax: expected"):
        qlora_linear(x, qw._replace(absmax=qw.absmax[:-1]), None, a, b, 1.0)
    with pytest.raises(ValueError, match="fmt: expected"):
        qlora_linear(x, qw._replace(fmt="nf8"), None, a, b, 1.0)
    with pytest.raises(ValueError, match="qdata: expected"):
        qlora_linear(x, qw._replace(data=qw.data[:10]), None, a, b, 1.0)
    with pytest.raises(ValueError, match="lora_B: expected shape"):
        qlora_linear(x, qw, None, a, b[:, :3], 1.0)
    with pytest.raises(TypeError, match="qweight"):
        qlora_linear(x, base.weight, None, a, b, 1.0)
    with pytest.raises(BackendUnavailableError, match="quantized"):
        from lora_kernels import lora_linear

        lora_linear(x, torch.randn(40, 72, device=DEVICE), None, a, b, 1.0, backend="triton_quantized+aten")


def test_unquantized_layer_refused():
    layer = bnb.nn.Linear4bit(64, 64, device="meta")
    with pytest.raises(ValueError, match="not quantized yet"):
        FusedLoRALinear.from_linear(layer, r=4)


# --------------------------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------------------------
def _op_args(save=True, p=0.0):
    base = _linear4bit(72, 40, "nf4", True, compute_dtype=torch.bfloat16)
    qw = quantized.quantized_weight(base)
    torch.manual_seed(3)
    x = torch.randn(7, 72, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(4, 72, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(40, 4, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    seed = seed_tensor(11) if p else None
    return (x, *quantized.unpack(qw), base.bias.bfloat16(), a, b, seed, 2.0, p, save, "torch")


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_opcheck(p):
    torch.library.opcheck(torch.ops.lora_kernels.qlora_linear_fwd, _op_args(True, p),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_torch_compile_matches_eager():
    base = _linear4bit(72, 40, "nf4", True, compute_dtype=torch.bfloat16)
    qw = quantized.quantized_weight(base)
    torch.manual_seed(4)
    a = torch.randn(4, 72, device=DEVICE, requires_grad=True)
    b = torch.randn(40, 4, device=DEVICE, requires_grad=True)

    def f(x):
        return qlora_linear(x, qw, base.bias, a, b, 2.0, 0.1, backend="torch", compute_dtype=torch.bfloat16)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    runs = []
    for fn in (f, compiled):
        torch.manual_seed(8)
        x = torch.randn(2, 5, 72, device=DEVICE, requires_grad=True)
        a.grad = b.grad = None
        y = fn(x)
        y.float().square().sum().backward()
        runs.append((y, x.grad, a.grad, b.grad))
    for e, c in zip(*runs):
        assert torch.equal(e, c)


# --------------------------------------------------------------------------------------------------------------
# The planner, and running without bitsandbytes
# --------------------------------------------------------------------------------------------------------------
def test_static_plans_of_quantized_calls():
    gpu = torch.device("cuda", 0)
    decode = plan.Call(gpu, torch.bfloat16, 1, 4096, 4096, 16, False, 0, False, 0, "nf4_dq")
    assert plan.static_plan(decode).forward == "triton_quantized"
    train = decode._replace(M=8192, dropout=True, grads=2)
    assert plan.static_plan(train).forward == "triton_cublas"
    assert plan.static_plan(decode._replace(quant="")).forward != "triton_quantized"
    assert plan.forward_unfit("triton_quantized", decode._replace(quant=""))
    assert plan.entry_key("auto", decode).endswith("|qnf4_dq")
    assert plan.entry_key("auto", decode._replace(quant="")) == plan.entry_key("auto", decode).rsplit("|", 1)[0]


def test_tuning_measures_quantized_variants():
    """The tuner times every eligible forward over a scratch quantized weight (the interpreter runs them; a
    counting timer stands in for CUDA events) and keeps the fastest."""
    call = plan.Call(DEVICE, torch.bfloat16, 3, 72, 40, 4, False, 2, False, 0, "fp4_dq")
    seen = []

    def timer(label, fn):
        fn()
        seen.append(label)
        return 1.0 if label != "forward:triton_quantized" else 0.5

    chosen, us = plan.tune(call, "triton", timer=timer)
    assert chosen.forward == "triton_quantized"
    assert {"forward:triton_quantized", "forward:triton_fused", "backward:triton_split"} <= set(seen)


def test_without_bitsandbytes_nothing_fails():
    code = ("import sys; sys.modules['bitsandbytes'] = None\n"
            "import torch, lora_kernels\n"
            "from lora_kernels import inject, quantized, _report\n"
            "m = inject(torch.nn.Sequential(torch.nn.Linear(8, 8)), ['0'], r=2)\n"
            "assert not quantized.is_quantized_linear(m[0])\n"
            "print(quantized.bitsandbytes_info())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "not available" in out.stdout


# --------------------------------------------------------------------------------------------------------------
# QDoRA: DoRA over a quantized base, fused
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,dq,p", [("nf4", True, 0.0), ("fp4", False, 0.0), ("nf4", True, 0.2)])
def test_qdora_matches_peft_dora_on_the_same_layer(fmt, dq, p):
    """PEFT's DoRA over the same Linear4bit (training mode: bitsandbytes' exact CPU path) and fuse()'s, in fp32: the
    output and the grads of x, A, B and the magnitude by the parity rule against PEFT in fp64 on the dequantized
    weight. With dropout: PEFT's layer is given our mask (recovered from the seed through the torch reference)."""
    peft = pytest.importorskip("peft")
    from lora_kernels.peft import fuse

    base = _linear4bit(128, 64, fmt, dq)
    model = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(
        r=6, lora_alpha=12, target_modules=["0"], use_dora=True, init_lora_weights=False, lora_dropout=p))
    with torch.no_grad():  # a magnitude away from the norms it starts at
        model.base_model.model[0].lora_magnitude_vector["default"].weight.mul_(1.3)
    reference_model = copy.deepcopy(model)
    fuse(model, backend="torch")
    x = torch.randn(21, 128, device=DEVICE)
    grad_y = torch.randn(21, 64, device=DEVICE)
    got, seed = {}, 1234
    for name, m in (("fused", model), ("peft", reference_model)):
        torch.manual_seed(seed)
        layer = m.base_model.model[0]
        layer.train()
        xi = x.clone().requires_grad_()
        if name == "peft" and p:  # PEFT's dropout module replaced by our mask for this seed
            torch.manual_seed(seed)
            s = draw_seed(x.device)
            keep = reference.dropout_keep_mask(int(s), 21, 128, p, device=x.device)
            layer.lora_dropout["default"] = _MaskDropout(keep, p)
        y = layer(xi)
        y.backward(grad_y)
        params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
                  layer.lora_magnitude_vector["default"].weight]
        got[name] = (y.detach(), xi.grad, *(t.grad for t in params))
    dense = copy.deepcopy(reference_model).double()
    layer64 = dense.base_model.model[0]
    w = reference.dequantize(quantized.quantized_weight(base), torch.float64)
    layer64.base_layer = nn.Linear(128, 64, device=DEVICE, dtype=torch.float64)
    with torch.no_grad():
        layer64.base_layer.weight.copy_(w)
        layer64.base_layer.bias.copy_(base.bias.double())
    layer64.base_layer.requires_grad_(False)
    if p:
        layer64.lora_dropout["default"] = _MaskDropout(keep, p)
    x64 = x.double().requires_grad_()
    y64 = layer64(x64)
    y64.backward(grad_y.double())
    ref = (y64.detach(), x64.grad, layer64.lora_A["default"].weight.grad, layer64.lora_B["default"].weight.grad,
           layer64.lora_magnitude_vector["default"].weight.grad)
    for i, what in enumerate(("y", "dx", "dA", "dB", "dm")):
        assert_parity(f"QDoRA {fmt} {what}", got["fused"][i], got["peft"][i], ref[i])


class _MaskDropout(nn.Module):
    """Dropout with a given keep-mask (PEFT's layer made to drop what the package's seed drops)."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.reshape(x.shape).to(x.dtype) / (1 - self.p) if self.training else x


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_qdora_layer_keeps_nothing_of_size_n_by_k(backend):
    """QuantizedLoRALinear(use_dora=True): trains the adapters and the magnitude, saves no [N, K] tensor for the
    backward, merges as DoRA (to_linear) and writes PEFT's magnitude key."""
    K, N, M, r = 128, 192, 24, 8
    base = _linear4bit(K, N, "nf4", True, compute_dtype=torch.bfloat16)
    layer = FusedLoRALinear.from_linear(base, r=r, lora_alpha=16, use_dora=True, backend=backend,
                                        init_lora_weights=False)
    assert isinstance(layer, QuantizedLoRALinear) and layer.use_dora
    from lora_kernels import tune

    assert [s[-1] for s in tune.model_shapes(layer)] == ["dora_nf4_dq"]  # tuned as the QDoRA calls are keyed
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    y, saved = _forward_saving_nothing_of_w0(layer, x, N, K)
    y.float().sum().backward()
    assert all(t.grad is not None for t in (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector))
    with torch.no_grad():
        dense = layer.to_linear()
        x32 = torch.randn(5, K, device=DEVICE)
        layer.eval()
        torch.testing.assert_close(layer(x32), dense(x32), rtol=0.05, atol=0.05)  # (the layer computes in bf16)
