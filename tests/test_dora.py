"""DoRA (use_dora=True): parity with PEFT's own DoRA layer in fp64 for the output and the grads of x, A, B and the
magnitude, in every plan; dropout in eval and in training (the mask recovered from the seed and handed to PEFT's
layer); no [N, K] tensor in the forward or backward; the norm kept in inference; the ops under opcheck and
torch.compile; merging, PEFT's files both ways, fuse() on PEFT's DoRA layers; clear refusals."""

import copy

import pytest
import torch
from torch import nn

from conftest import DEVICE, assert_parity, seed_tensor
from lora_kernels import FusedLoRALinear, dora, inject, lora_layers, plan, reference
from lora_kernels.dora import dora_linear, dora_weight_norm

peft = pytest.importorskip("peft")


class _KnownMask(nn.Module):
    """Stands in for PEFT's nn.Dropout: the package's mask for a known seed (the mask-recovery trick)."""

    def __init__(self, seed: int, p: float):
        super().__init__()
        self.seed, self.p = seed, p

    def forward(self, x):
        keep = reference.dropout_keep_mask(self.seed, x.reshape(-1, x.shape[-1]).shape[0], x.shape[-1], self.p,
                                           device=x.device).reshape(x.shape)
        return torch.where(keep, x / (1 - self.p), 0.0)


def _peft_dora(K, N, r, dtype, bias=True, conv1d=False, p=0.0, seed=0):
    """A PEFT DoRA layer over a fresh base (random B and a magnitude away from the norms, so every term counts)."""
    torch.manual_seed(seed)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(N, K)
        nn.init.normal_(base.weight, std=K ** -0.5)
        nn.init.normal_(base.bias)
        target = base
    else:
        base = nn.Linear(K, N, bias=bias)
    base = base.to(device=DEVICE, dtype=dtype)
    model = peft.get_peft_model(nn.Sequential(base), peft.LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"], use_dora=True, init_lora_weights=False,
        fan_in_fan_out=conv1d))
    layer = model.base_model.model[0]
    with torch.no_grad():
        m = layer.lora_magnitude_vector["default"].weight
        m.mul_(torch.rand(m.shape, device=m.device, dtype=m.dtype) + 0.5)
    return layer


def _ours_like(peft_layer, backend, p=0.0):
    """Our DoRA layer on the same base weight, adapters and magnitude (the adapters' dtype as PEFT's: fp32)."""
    base = peft_layer.get_base_layer()
    conv1d = peft_layer.fan_in_fan_out
    make = FusedLoRALinear.from_conv1d if conv1d else FusedLoRALinear.from_linear
    ours = make(base, r=peft_layer.r["default"], lora_alpha=peft_layer.lora_alpha["default"], lora_dropout=p,
                use_dora=True, backend=backend)
    with torch.no_grad():
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
        ours.lora_magnitude_vector.copy_(peft_layer.lora_magnitude_vector["default"].weight)
    return ours


def _run(layer, x, gy, params):
    x = x.clone().requires_grad_(True)
    for t in params:
        t.grad = None
    y = layer(x)
    y.backward(gy.to(y.dtype))
    return [y.detach(), x.grad] + [t.grad.clone() for t in params]


def _peft_params(layer):
    return [layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight]


def _check(peft_layer, backend, M, p=0.0, training=True):
    """Ours vs PEFT's layer in fp64 (the reference) by the parity rule; the same-dtype error is the reference
    formulas' in x's dtype (adapters rounded to it, as the kernels use them)."""
    dtype = peft_layer.get_base_layer().weight.dtype
    K, N = peft_layer.in_features, peft_layer.out_features
    ours = _ours_like(peft_layer, backend, p).train(training)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    gy = torch.randn(M, N, device=DEVICE, dtype=dtype)
    torch.manual_seed(11)
    mine = _run(ours, x, gy, [ours.lora_A, ours.lora_B, ours.lora_magnitude_vector])
    seed = None
    if p > 0 and training:
        torch.manual_seed(11)
        seed = int(torch.randint(0, 2**62, (1,)).item())  # the seed the layer drew
    p_eff = p if training else 0.0
    ref64 = copy.deepcopy(peft_layer).double().train(training)
    if seed is not None:
        ref64.lora_dropout["default"] = _KnownMask(seed, p)
    expected = _run(ref64, x.double(), gy.double(), _peft_params(ref64))
    w = ours.base_weight().detach()
    a, b, m = (t.detach() for t in (ours.lora_A, ours.lora_B, ours.lora_magnitude_vector))
    norm = dora_weight_norm(w, a, b, ours.scaling)[0]
    bias = ours.bias.detach() if ours.bias is not None else None
    y, xa, prod = reference.dora_forward(x, w, bias, a.to(dtype), b.to(dtype), m, norm, ours.scaling, p_eff, seed)
    grads = reference.dora_backward(gy, x, w, a.to(dtype), b.to(dtype), m, norm, xa, prod, ours.scaling, p_eff, seed)
    same = [y, *grads]
    for name, out, s, r in zip(("y", "grad x", "grad lora_A", "grad lora_B", "grad magnitude"), mine, same,
                               expected):
        assert_parity(f"{backend} {name}", out, s.to(out.dtype), r)


def _plans(dtype, p, M=37, K=45, N=70, r=3):
    call = plan.Call(DEVICE, dtype, M, K, N, r, p > 0, 2, False)
    fwds, bwds, _ = plan.candidates(call)
    return [f"{f}+{b}" for f in fwds for b in bwds]


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_plan_matches_peft_dora(dtype, p):
    layer = _peft_dora(45, 70, 3, dtype, p=p)
    specs = _plans(dtype, p)
    assert len(specs) >= (1 if dtype == torch.float32 else 6)
    for spec in specs:
        _check(layer, spec, 37, p)


@pytest.mark.parametrize("shape", [(1, 33, 17, 1, True), (19, 80, 72, 64, False), (5, 96, 80, 7, True)],
                         ids=lambda s: "M{}K{}N{}r{}bias{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_odd_shapes_and_ranks(dtype, shape):
    M, K, N, r, bias = shape
    _check(_peft_dora(K, N, r, dtype, bias=bias), "auto", M)
    if dtype != torch.float32:
        _check(_peft_dora(K, N, r, dtype, bias=bias, p=0.1), "triton", M, p=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fan_in_fan_out_conv1d(dtype):
    _check(_peft_dora(40, 56, 4, dtype, conv1d=True), "auto" if dtype == torch.float32 else "triton", 9)


def test_dropout_is_off_in_eval():
    """In eval PEFT (and this package) take the no-dropout form: the magnitude on the base product of x itself."""
    _check(_peft_dora(45, 70, 3, torch.bfloat16, p=0.3), "triton", 21, p=0.3, training=False)


def test_weight_norm_needs_no_n_by_k_tensor_and_matches_the_definition():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        w = torch.randn(70, 45, device=DEVICE, dtype=dtype)
        a, b = torch.randn(3, 45, device=DEVICE), torch.randn(70, 3, device=DEVICE)
        norm, sq = dora_weight_norm(w, a, b, 0.7)
        exact = torch.linalg.vector_norm(w.double() + 0.7 * (b.double() @ a.double()), dim=1)
        assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(norm.double(), exact, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sq.double(), torch.linalg.vector_norm(w.double(), dim=1).square(), rtol=1e-5,
                                   atol=1e-5)


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """The number of elements of every new storage an op returns (views of its inputs are not allocations)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                self.numels.append((func.overloadpacket.__name__, t.untyped_storage().nbytes() // t.element_size()))
        return out


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("aten", torch.float32),
                                           ("triton", torch.bfloat16)], ids=["torch", "aten", "triton"])
def test_no_op_allocates_n_by_k(backend, dtype, p):
    """Forward and backward of a DoRA layer in training (the norm included): no op allocates a tensor of N x K
    elements or more (W0 itself is the only one); M x K, M x N and rank-sized ones are expected. Triton launches are
    stubbed (their allocations are the launchers', what a GPU sees; the interpreter's own copies are not)."""
    from bench.host import triton_launches_stubbed

    M, K, N = 6, 96, 80  # N x K = 7680 > M x K, M x N
    layer = FusedLoRALinear(K, N, r=4, lora_dropout=p, use_dora=True, init_lora_weights=False, backend=backend,
                            device=DEVICE, dtype=dtype).train()
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, requires_grad=True)
    with triton_launches_stubbed(), _Allocations() as sizes:
        layer(x).float().square().sum().backward()
    big = [(op, n) for op, n in sizes.numels if n >= N * K]
    assert not big, big
    assert layer.lora_magnitude_vector.grad is not None and layer.lora_A.grad is not None


def test_norm_kept_in_inference_until_an_input_changes(monkeypatch):
    layer = FusedLoRALinear(40, 36, r=4, use_dora=True, init_lora_weights=False, device=DEVICE).eval()
    calls = []
    real = dora.dora_weight_norm
    monkeypatch.setattr(dora, "dora_weight_norm", lambda *a, **k: calls.append(a[4] if len(a) > 4 else
                                                                                k.get("w0_sq")) or real(*a, **k))
    x = torch.randn(3, 40, device=DEVICE)
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first) and len(calls) == 1  # the norm kept
        layer.lora_B.mul_(1.5)
        changed = layer(x)
        assert len(calls) == 2 and calls[1] is not None  # recomputed; ||W0||^2 kept (W0 unchanged)
        layer.weight.mul_(2.0)
        layer(x)
        assert len(calls) == 3 and calls[2] is None  # W0 changed: its squares too
    assert not torch.equal(changed, first)
    layer.train()
    layer(x).sum().backward()
    layer(x).sum().backward()
    assert len(calls) == 5 and calls[4] is not None  # training: the norm each step, ||W0||^2 kept


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    dtype = torch.float64 if backend == "torch" else torch.float32
    K, N, r, M = 24, 20, 4, 13
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype) / 5
    a, b = torch.randn(r, K, device=DEVICE, dtype=dtype) / 5, torch.randn(N, r, device=DEVICE, dtype=dtype)
    m = torch.rand(N, device=DEVICE, dtype=dtype) + 0.5
    norm = dora_weight_norm(w, a, b, 0.5)[0].to(dtype)
    backend = backend if dtype != torch.float32 else "aten"
    for p, seed in ((0.0, None), (0.2, seed_tensor(5))):
        args = (x, w, None, a.requires_grad_(), b.requires_grad_(), m.requires_grad_(), norm, seed, 0.5, p, True,
                backend)
        torch.library.opcheck(torch.ops.lora_kernels.dora_linear_fwd.default, args)


def test_torch_compile_fullgraph_matches_eager():
    from conftest import assert_compiled_matches_eager

    for p in (0.0, 0.1):
        layer = FusedLoRALinear(16, 12, r=3, lora_alpha=6, lora_dropout=p, use_dora=True, init_lora_weights=False,
                                device=DEVICE).train()
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        assert_compiled_matches_eager(layer, compiled, [torch.randn(2, 5, 16, device=DEVICE)],
                                      [layer.lora_A, layer.lora_magnitude_vector])


def test_merge_unmerge_and_to_linear_as_peft_merges():
    peft_layer = _peft_dora(40, 36, 4, torch.float32)
    ours = _ours_like(peft_layer, "auto").eval()
    x = torch.randn(5, 40, device=DEVICE)
    with torch.no_grad():
        y = ours(x)
        merged_peft = copy.deepcopy(peft_layer)
        merged_peft.merge()
        torch.testing.assert_close(merged_peft.get_base_layer().weight, ours.merged_weight(), rtol=1e-5, atol=1e-6)
        plain = ours.to_linear()
        torch.testing.assert_close(plain(x), y, rtol=1e-5, atol=1e-5)
        w0 = ours.weight.clone()
        ours.merge()
        torch.testing.assert_close(ours(x), y, rtol=1e-5, atol=1e-5)
        ours.unmerge()
        torch.testing.assert_close(ours.weight, w0, rtol=1e-5, atol=1e-6)


def _llama():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(DEVICE)


def test_peft_files_both_ways(tmp_path):
    from lora_kernels import load_adapter, save_adapter

    targets = ["q_proj", "v_proj", "down_proj"]
    base = _llama()
    torch.manual_seed(3)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                  use_dora=True, init_lora_weights=False))
    with torch.no_grad():
        for n, prm in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                prm.mul_(1.2)
    pm.save_pretrained(tmp_path / "peft")
    ours = inject(copy.deepcopy(base), targets, r=4, lora_alpha=8, use_dora=True)
    load_adapter(ours, tmp_path / "peft")
    ids = torch.randint(0, 64, (2, 7), device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, pm(ids).logits, rtol=1e-4, atol=1e-4)
    save_adapter(ours, tmp_path / "ours")
    import json

    assert json.load(open(tmp_path / "ours" / "adapter_config.json"))["use_dora"] is True
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, pm(ids).logits, rtol=1e-4, atol=1e-4)
    plain = inject(copy.deepcopy(base), targets, r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="the file's adapter uses DoRA"):
        load_adapter(plain, tmp_path / "peft")


def _gpt2():
    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)  # the model's own dropout would differ per run
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).to(DEVICE)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fuse_takes_peft_dora_layers_and_matches_peft(arch):
    """fuse() on a PeftModel with use_dora=True, plain Linear (Llama) and Conv1D (GPT-2) bases: PEFT's logits and
    grads (the magnitude's included)."""
    import warnings

    from lora_kernels.peft import FusedPeftLinear, fuse

    base, targets = (_llama(), ["q_proj", "v_proj"]) if arch == "llama" else (_gpt2(), ["c_attn", "c_fc"])
    torch.manual_seed(4)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                  use_dora=True, init_lora_weights=False))
    reference_pm = copy.deepcopy(pm)
    fuse(pm)
    assert all(type(m) is FusedPeftLinear for m in pm.modules() if isinstance(m, peft.tuners.lora.layer.Linear))
    ids = torch.randint(0, 64, (2, 6), device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning: DoRA is fused
        out = pm(ids).logits
    ref = reference_pm(ids).logits
    ref64 = copy.deepcopy(reference_pm).double()(ids).logits
    assert_parity("logits", out, ref, ref64)
    (out.float() ** 2).mean().backward()
    (ref.float() ** 2).mean().backward()
    (ref64 ** 2).mean().backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    ref_grads = dict(reference_pm.named_parameters())
    ref64_grads = dict(copy.deepcopy(reference_pm).named_parameters())  # names only
    assert any("lora_magnitude_vector" in n for n in grads)
    for n, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), n
        torch.testing.assert_close(g, ref_grads[n].grad, rtol=1e-3, atol=1e-5)
    assert ref64_grads


def test_mixed_batches_and_a_trainable_base_are_refused():
    layer = FusedLoRALinear(16, 12, r=2, device=DEVICE)
    layer.add_adapter("d", r=2, use_dora=True)
    x = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"mixed batches run LoRA adapters only; \['d'\] use DoRA"):
        layer(x, adapter_ids=torch.tensor([0, 1, 0, -1], device=DEVICE))
    layer.set_adapter("d")
    layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="weight: DoRA needs a frozen base weight"):
        layer(x)


def test_inject_with_dora_state_dict_and_named_adapters():
    model = inject(_llama(), ["q_proj"], r=4, use_dora=True)
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.use_dora and "lora_magnitude_vector" in layer.state_dict()
    torch.testing.assert_close(layer.lora_magnitude_vector,
                               torch.linalg.vector_norm(layer.weight.float(), dim=1))  # B = 0: the rows' norms
    layer.add_adapter("plain", r=2)
    assert not layer.adapters["plain"].use_dora and layer.adapters["plain"].lora_magnitude_vector is None
    copy_ = copy.deepcopy(layer)
    copy_.load_state_dict(layer.state_dict())
    assert torch.equal(copy_.lora_magnitude_vector, layer.lora_magnitude_vector)
